// The dashboard playground: streams a chat answer from Keyway's own /v1/chat/completions into the page.
//
// The page calls the API like any client, with a short-lived chat-only key it asks the dashboard for (a POST
// with the CSRF token). The secret lives in this closure only: never in storage, a cookie or the page, so it
// goes when the page goes, and it is reused until shortly before it expires rather than made per message.
"use strict";

(() => {
  const form = document.getElementById("playground");
  if (!form) return;
  const byId = (id) => document.getElementById(id);
  const fields = {
    model: byId("pg-model"),
    project: byId("pg-project"),
    system: byId("pg-system"),
    temperature: byId("pg-temperature"),
    maxTokens: byId("pg-max-tokens"),
    message: byId("pg-message"),
  };
  const transcript = byId("pg-transcript");
  const errorBox = byId("pg-error");
  const usageLine = byId("pg-usage");
  const keyStatus = byId("pg-key-status");
  const sendButton = byId("pg-send");
  const stopButton = byId("pg-stop");
  const clearButton = byId("pg-clear");
  const csrfToken = form.querySelector('input[name="csrfmiddlewaretoken"]').value;
  // A key this close to its expiry is replaced before a message, so an answer never outlives its key.
  const RENEW_BEFORE_MS = 60 * 1000;

  let key = null; // {secret, masked, project, projectName, expiresAt}
  let controller = null; // the AbortController of the answer being streamed
  const history = []; // the conversation so far, as the API's messages
  let conversation = 0; // counts clears: an answer that ends after one no longer belongs to the history

  class PlaygroundError extends Error {
    constructor(message, code) {
      super(message);
      this.code = code || "";
    }
  }

  // Keyway answers with OpenAI's error object; anything else (Django's CSRF page, a proxy's) gets a sentence.
  async function errorFrom(response) {
    let message = `The request failed with HTTP ${response.status}.`;
    let code = "";
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        code = body.error.code || body.error.type || "";
      }
    } catch (_) {
      if (response.status === 403) message = "The dashboard refused the request: your session may have ended. Reload the page.";
    }
    const retry = response.headers.get("Retry-After");
    if (retry && !/try again/i.test(message)) message += ` Try again in ${retry}s.`;
    return new PlaygroundError(message, code);
  }

  async function mintKey(project) {
    const response = await fetch(form.dataset.mintUrl, {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-CSRFToken": csrfToken, Accept: "application/json" },
      body: new URLSearchParams({ project }),
    });
    if (!response.ok) throw await errorFrom(response);
    const made = await response.json();
    return {
      secret: made.key,
      masked: made.masked,
      project: made.project.id,
      projectName: made.project.name,
      // From the server's lifetime and this clock, so a skewed clock cannot keep a dead key.
      expiresAt: Date.now() + made.expires_in * 1000,
    };
  }

  async function currentKey() {
    const project = fields.project.value;
    if (key && key.project === project && key.expiresAt - Date.now() > RENEW_BEFORE_MS) return key;
    key = null;
    key = await mintKey(project);
    const until = new Date(key.expiresAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    keyStatus.textContent = `This page uses ${key.masked}, a chat-only key made for it in ${key.projectName}, until ${until}.`;
    return key;
  }

  async function callChat(body, signal) {
    for (let attempt = 0; ; attempt += 1) {
      const { secret } = await currentKey();
      const response = await fetch(form.dataset.chatUrl, {
        method: "POST",
        signal,
        cache: "no-store",
        credentials: "omit",
        headers: { Authorization: `Bearer ${secret}`, "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
      });
      // The key was revoked (from the key list, say) since it was made: make another, once.
      if (response.status === 401 && attempt === 0) {
        key = null;
        continue;
      }
      if (!response.ok) throw await errorFrom(response);
      return response;
    }
  }

  function turn(role, text) {
    const empty = byId("pg-transcript-empty");
    if (empty) empty.remove();
    const item = document.createElement("li");
    item.className = `turn turn-${role}`;
    const who = document.createElement("span");
    who.className = "turn-role";
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("div");
    body.className = "turn-text";
    body.textContent = text;
    item.append(who, body);
    transcript.append(item);
    transcript.scrollTop = transcript.scrollHeight;
    return item;
  }

  function requestBody() {
    const messages = [];
    const system = fields.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = { model: fields.model.value, messages, stream: true, stream_options: { include_usage: true } };
    // Out-of-range values go to the API as typed: its error says what is allowed, as it would to any client.
    const temperature = Number.parseFloat(fields.temperature.value);
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const maxTokens = Number.parseInt(fields.maxTokens.value, 10);
    if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
    return body;
  }

  // Reads the Server-Sent Events of a streamed answer, calling onChunk with each parsed `data:` object.
  async function readEvents(response, onChunk) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end = buffer.indexOf("\n\n");
      while (end >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        end = buffer.indexOf("\n\n");
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        // An error after the first byte arrives as an event holding OpenAI's error object.
        if (chunk.error) throw new PlaygroundError(chunk.error.message, chunk.error.code || chunk.error.type);
        onChunk(chunk);
      }
    }
  }

  function seconds(ms) {
    return `${(ms / 1000).toFixed(2)} s`;
  }

  function showError(error) {
    errorBox.textContent = error.code ? `${error.message} (${error.code})` : error.message;
    errorBox.hidden = false;
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function send() {
    const text = fields.message.value.trim();
    if (!text || controller) return;
    errorBox.hidden = true;
    usageLine.textContent = "";
    history.push({ role: "user", content: text });
    const userTurn = turn("user", text);
    fields.message.value = "";
    const body = requestBody();
    const mine = conversation;
    controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    let answer = null;
    let answerText = "";
    let firstTokenAt = null;
    let usage = null;
    let finish = null;
    let model = body.model;
    try {
      const response = await callChat(body, controller.signal);
      answer = turn("assistant", "");
      answer.classList.add("streaming");
      const answerBody = answer.querySelector(".turn-text");
      await readEvents(response, (chunk) => {
        if (chunk.model) model = chunk.model;
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (firstTokenAt === null) firstTokenAt = performance.now();
          answerText += delta;
          answerBody.textContent = answerText;
          transcript.scrollTop = transcript.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
      if (mine === conversation) history.push({ role: "assistant", content: answerText });
      const took = performance.now() - started;
      const parts = [];
      if (usage) {
        parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`);
      }
      if (firstTokenAt !== null) parts.push(`first token after ${seconds(firstTokenAt - started)}`);
      parts.push(`${seconds(took)} in all`, model);
      if (finish) parts.push(`finish: ${finish}`);
      usageLine.textContent = parts.join(" · ");
    } catch (error) {
      const stopped = error.name === "AbortError";
      if (mine !== conversation) return;
      if (answerText) {
        // What was produced stays in the conversation (and is billed): the next message can build on it.
        history.push({ role: "assistant", content: answerText });
        if (!stopped) answer.classList.add("turn-failed");
      } else {
        if (answer) answer.remove();
        history.pop();
        if (!stopped) userTurn.classList.add("turn-failed");
        // Nothing came back: the message goes back into the box, to be sent again once the error is fixed.
        if (!fields.message.value) fields.message.value = text;
      }
      if (stopped) {
        usageLine.textContent = `Stopped after ${seconds(performance.now() - started)}. The tokens produced so far are billed.`;
      } else {
        showError(error instanceof PlaygroundError ? error : new PlaygroundError(`The answer failed: ${error.message}`));
      }
    } finally {
      if (answer) answer.classList.remove("streaming");
      controller = null;
      setBusy(false);
      fields.message.focus();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  fields.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => {
    if (controller) controller.abort();
  });
  clearButton.addEventListener("click", () => {
    conversation += 1;
    if (controller) controller.abort();
    history.length = 0;
    transcript.replaceChildren();
    const empty = document.createElement("li");
    empty.id = "pg-transcript-empty";
    empty.className = "transcript-empty muted";
    empty.textContent = "Send a message to start.";
    transcript.append(empty);
    usageLine.textContent = "";
    errorBox.hidden = true;
  });
  fields.model.addEventListener("change", () => {
    const context = fields.model.selectedOptions[0].dataset.context;
    if (context) fields.maxTokens.max = context;
  });
})();
