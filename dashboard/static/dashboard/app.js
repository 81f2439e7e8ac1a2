// Keyway dashboard behaviour. No inline scripts (the Content-Security-Policy forbids them), no dependencies.
"use strict";

function copyFrom(button) {
  const field = document.getElementById(button.dataset.copy);
  if (!field) return;
  const done = () => {
    const label = button.textContent;
    button.textContent = "Copied";
    button.setAttribute("aria-live", "polite");
    setTimeout(() => { button.textContent = label; }, 2000);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, () => { field.select(); document.execCommand("copy"); done(); });
  } else {
    field.select();
    document.execCommand("copy");
    done();
  }
}

function showRestrictedScopes() {
  const chosen = document.querySelector('input[name="permissions"]:checked');
  const box = document.getElementById("restricted-scopes");
  if (box) box.hidden = !chosen || chosen.value !== "restricted";
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", () => copyFrom(button));
  });
  document.querySelectorAll('input[name="permissions"]').forEach((radio) => {
    radio.addEventListener("change", showRestrictedScopes);
  });
  showRestrictedScopes();
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
  document.querySelectorAll("select[data-autosubmit]").forEach((select) => {
    select.addEventListener("change", () => select.form.requestSubmit());
  });
});
