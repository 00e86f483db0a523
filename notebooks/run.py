"""Run a notebook headless (a real Jupyter kernel) and print what each cell shows.

    python notebooks/run.py notebooks/quickstart.ipynb [--save OUT.ipynb]

This is the README's main job: the quick start notebook, executed on the
local backend, with its outputs printed as text (images as a placeholder).
"""

from __future__ import annotations

import argparse
import sys
import time

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient


def text_of(output: dict) -> str:
    """A terminal rendering of one cell output."""
    kind = output.get("output_type")
    if kind == "stream":
        return output.get("text", "")
    if kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        prefix = f"Out[{output.get('execution_count')}]: " if kind == "execute_result" else ""
        if "image/png" in data:
            return f"{prefix}[image/png, {len(data['image/png']) * 3 // 4:,} bytes]\n"
        return prefix + str(data.get("text/markdown") or data.get("text/plain", "")) + "\n"
    if kind == "error":
        return f"{output.get('ename')}: {output.get('evalue')}\n"
    return ""


def print_cell(cell: dict) -> None:
    """A cell as text: markdown as comments, code as In [n] with its outputs."""
    if cell.get("cell_type") == "markdown":
        print("\n" + "\n".join("# " + line for line in cell["source"].splitlines()))
        return
    print(f"\nIn [{cell.get('execution_count') or ' '}]: " + cell["source"].replace("\n", "\n        "))
    for output in cell.get("outputs", []):
        sys.stdout.write(text_of(output))


def main(argv: list[str] | None = None) -> int:
    """Execute the notebook, print it, return 0 when every cell ran as its tags expect."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook")
    p.add_argument("--save", help="also write the executed notebook here")
    p.add_argument("--timeout", type=int, default=300, help="per-cell timeout in seconds")
    args = p.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    t0 = time.perf_counter()
    shown = 0

    def show_until(index: int) -> None:
        """Print the cells up to ``index`` (markdown before it too), as soon as they have run."""
        nonlocal shown
        for cell in nb.cells[shown:index + 1]:
            print_cell(cell)
        shown = max(shown, index + 1)
        sys.stdout.flush()

    # IPC transport: a local kernel, no "running over TCP without encryption" warning
    km = KernelManager(kernel_name="python3", transport="ipc")
    client = NotebookClient(nb, km=km, timeout=args.timeout, kernel_name="python3",
                            on_cell_executed=lambda cell_index, **_kw: show_until(cell_index))
    try:
        client.execute()
        ok = True
    except Exception as exc:  # a cell failed that was not tagged raises-exception
        show_until(len(nb.cells) - 1)
        print(f"\n!! {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}", file=sys.stderr)
        ok = False
    finally:
        if km.has_kernel:  # ours, not nbclient's: shut it down, or it warns that its parent exited
            km.shutdown_kernel()
    show_until(len(nb.cells) - 1)
    print(f"\n[{args.notebook} ran in {time.perf_counter() - t0:.1f} s]")
    if args.save:
        nbformat.write(nb, args.save)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
