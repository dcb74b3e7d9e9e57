#!/usr/bin/env python3
"""Container health check: exit 0 when GET /readyz answers 2xx (models loaded, not draining).

Used by the image's HEALTHCHECK and by docker-compose.yml. Standard library only, so the image
needs no curl. Honors KDIFF_PORT (default 8000); KDIFF_HEALTHCHECK_URL overrides the whole URL.
"""

import os
import sys
import urllib.error
import urllib.request

url = os.environ.get("KDIFF_HEALTHCHECK_URL") or f"http://127.0.0.1:{os.environ.get('KDIFF_PORT', '8000')}/readyz"
try:
    with urllib.request.urlopen(url, timeout=4) as resp:
        sys.exit(0 if 200 <= resp.status < 300 else 1)
except urllib.error.HTTPError as exc:  # 503 while loading or draining
    print(f"{url}: HTTP {exc.code}", file=sys.stderr)
except Exception as exc:  # connection refused, timeout
    print(f"{url}: {exc}", file=sys.stderr)
sys.exit(1)
