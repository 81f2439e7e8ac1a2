"""Text out of an untrusted PDF, in a process of its own: `python -m completions.api.pdf_worker PAGES CHARS MB`
reads the PDF on stdin and writes {"text": ...} or {"error": ...} as JSON on stdout.

PDF parsers have a long history of inputs that loop forever or decompress into gigabytes. Here that can only
cost this process: it caps its own address space (MB) before reading a byte, the server kills it after
KEYWAY_PDF_TIMEOUT, and it reads at most PAGES pages and keeps at most CHARS characters. No Django here:
the process starts in a fraction of a second.
"""

from __future__ import annotations

import io
import json
import resource
import sys


def main() -> None:
    max_pages, max_chars, megabytes = (int(value) for value in sys.argv[1:4])
    limit = megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    pdf = sys.stdin.buffer.read()
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(pdf))
        if len(reader.pages) > max_pages:
            result = {"error": f"The PDF has {len(reader.pages)} pages; at most {max_pages} are read."}
        else:
            parts, size = [], 0
            for page in reader.pages:
                text = (page.extract_text() or "").strip()
                if text:
                    parts.append(text[: max_chars - size])
                    size += len(parts[-1])
                if size >= max_chars:
                    break
            result = {"text": "\n\n".join(parts)}
    except MemoryError:
        result = {"error": "The PDF needs more memory to read than this server allows."}
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file is the file's
        result = {"error": f"The PDF could not be read ({type(exc).__name__})."}
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
