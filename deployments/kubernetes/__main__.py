"""Write the derived manifests: ``python -m deployments.kubernetes``."""

from __future__ import annotations

import sys

from deployments.kubernetes import ROOT, render


def main() -> int:
    for path, text in render().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        changed = not path.exists() or path.read_text() != text
        path.write_text(text)
        print(f"{'wrote' if changed else 'same '} {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
