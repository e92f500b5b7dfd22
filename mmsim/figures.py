"""What the terminal picture and the HTML view share: the palette, the glyphs and the per-order figures.

**Palette.** One set of eleven colours, chosen so that every two of them stay
apart (CIEDE2000 of at least 12) for normal vision and as simulated for
protanopia, deuteranopia and tritanopia (``mmsim.colour`` measures it;
``python -m mmsim.colour`` prints the closest pairs). The kernel classes and
the first client colours come from Paul Tol's colour-blind-safe schemes. Kernel free
is light blue, kernel used orange, kernel shared purple, not RAM dark grey,
user free white; frames in use by clients take one of five client colours (in
the terminal picture, which does not tell clients apart: mapped, shared and
large-page frames take the first three). Colour is never the only cue: each
class also has a glyph (a letter in the terminal, a letter or the client's tag
in the HTML view), so the picture reads without colour (``NO_COLOR``, output
redirected, colour-blind readers).

**Free blocks per order** (``free_blocks``), as Linux's ``/proc/buddyinfo``
shows them: split the free frames into the largest aligned blocks of 2^order
frames that a buddy allocator would hold (a block of order k starts at a
multiple of 2^k frames, and is counted at order k only if its buddy is not
free as well, unless k is the highest order), and count the blocks of each
order. Every free frame is in exactly one block, so the sum of count x 2^order
is the number of free frames. We keep no buddy allocator, so this says what
one would have: how much contiguous memory there is, not how it was allocated.
The highest order is that of the profile's largest large page (i686 10:
4 MiB; i686-pae 9: 2 MiB; x86_64 18: 1 GiB).

**Fragmentation index** (``extfrag_index``), as Linux computes
``extfrag_index`` (mm/vmstat.c, ``__fragmentation_index``): for a request of
order k, if some free block of order k or more exists the request would
succeed and the index is -1 (shown as -1.000); if nothing is free it is 0;
otherwise it is 1 - (1 + free_frames / 2^k) / free_blocks, where free_blocks
counts the free blocks of every order. Near 0 the request fails for lack of
memory; near 1 it fails because the free memory is in pieces too small
(fragmentation). Linux returns it in thousandths as an integer; so do we,
rounding the same way (integer division).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from protocol import PAGE_SHIFT

# ---- palette -------------------------------------------------------------------------------------

NOT_RAM_COLOUR = "#555555"
KERNEL_FREE_COLOUR = "#99DDFF"
KERNEL_USED_COLOUR = "#EE7733"
KERNEL_SHARED_COLOUR = "#AA4499"
USER_FREE_COLOUR = "#FFFFFF"
UNKNOWN_OWNER_COLOUR = "#000000"  # a mapped user frame no listed mapping names (it changed meanwhile)
CLIENT_COLOURS = ("#332288", "#EECC66", "#117733", "#A5AA99", "#6699CC")  # clients take them in turn
DISAGREE_COLOUR = "#FF00FF"  # the overlay of frames where the mm's view and the kernel's differ (with outlines)


class FrameClass(NamedTuple):
    code: int
    name: str
    label: str
    style: str  # rich style of the class's colour
    colour: str  # '#RRGGBB'
    glyph: str  # the cell is all this class
    partial: str  # the class is the most notable one in the cell, but not all of it


def _style(colour: str) -> str:
    if colour == USER_FREE_COLOUR:  # free memory stays quiet on a terminal: a dot, no fill
        return "grey62"
    return f"on {colour}"


# The terminal picture's classes (codes are stable: tests and older callers use them).
CLASSES: tuple[FrameClass, ...] = (
    FrameClass(0, "reserved", "reserved / not RAM", "grey30", NOT_RAM_COLOUR, "X", "x"),
    FrameClass(1, "kernel_free", "kernel free", "", KERNEL_FREE_COLOUR, "F", "f"),
    FrameClass(2, "kernel_used", "kernel used", "", KERNEL_USED_COLOUR, "K", "k"),
    FrameClass(3, "kernel_shared", "kernel shared (read-only)", "", KERNEL_SHARED_COLOUR, "R", "r"),
    FrameClass(4, "user_free", "user free", "", USER_FREE_COLOUR, "·", "·"),
    FrameClass(5, "user_mapped", "user mapped", "", CLIENT_COLOURS[0], "M", "m"),
    FrameClass(6, "user_shared", "user shared (refcount > 1)", "", CLIENT_COLOURS[1], "S", "s"),
    FrameClass(7, "user_large", "user large page", "", CLIENT_COLOURS[2], "L", "l"),
)
CLASSES = tuple(c._replace(style=_style(c.colour)) for c in CLASSES)
RESERVED, KERNEL_FREE, KERNEL_USED, KERNEL_SHARED, USER_FREE, USER_MAPPED, USER_SHARED, USER_LARGE = range(8)
# most notable first: a terminal cell shows the most notable class among its frames
NOTABLE = (USER_SHARED, USER_LARGE, USER_MAPPED, KERNEL_USED, KERNEL_SHARED, KERNEL_FREE, USER_FREE, RESERVED)

TERMINAL_COLOURS = {c.name: c.colour for c in CLASSES}
HTML_COLOURS = {
    "not_ram": NOT_RAM_COLOUR, "kernel_free": KERNEL_FREE_COLOUR, "kernel_used": KERNEL_USED_COLOUR,
    "kernel_shared": KERNEL_SHARED_COLOUR, "user_free": USER_FREE_COLOUR, "owner_unknown": UNKNOWN_OWNER_COLOUR,
    **{f"client_{i}": c for i, c in enumerate(CLIENT_COLOURS)},
}


def text_colour(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (relative luminance, WCAG)."""
    h = background.lstrip("#")
    lin = [(v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4) for v in (int(h[i:i + 2], 16) / 255
                                                                               for i in (0, 2, 4))]
    y = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "#000000" if (y + 0.05) / 0.05 >= 1.05 / (y + 0.05) else "#FFFFFF"


# ---- the view's per-frame codes ------------------------------------------------------------------
# One uint16 per frame: the frame's owner, as the HTML view colours it.

NOT_RAM, K_FREE, K_USED, K_SHARED, U_FREE, U_UNKNOWN = 0, 1, 2, 3, 4, 5
OWNER_BASE = 16  # code OWNER_BASE + i: a user frame mapped by owner i (the i-th process the recording saw)
MAX_OWNERS = 65535 - OWNER_BASE
CODE_NAMES = {NOT_RAM: "not RAM", K_FREE: "kernel free", K_USED: "kernel used", K_SHARED: "kernel shared",
              U_FREE: "user free", U_UNKNOWN: "user mapped (no mapping found: it changed while the snapshot was read)"}
CODE_COLOURS = {NOT_RAM: NOT_RAM_COLOUR, K_FREE: KERNEL_FREE_COLOUR, K_USED: KERNEL_USED_COLOUR,
                K_SHARED: KERNEL_SHARED_COLOUR, U_FREE: USER_FREE_COLOUR, U_UNKNOWN: UNKNOWN_OWNER_COLOUR}
CODE_GLYPHS = {NOT_RAM: "×", K_FREE: "F", K_USED: "K", K_SHARED: "R", U_FREE: "", U_UNKNOWN: "?"}
KIND_CODE = {"none": NOT_RAM, "kernel_free": K_FREE, "kernel_used": K_USED, "kernel_shared": K_SHARED,
             "user": U_FREE}


def owner_tag(i: int) -> str:
    """The short tag of owner ``i`` drawn on its frames (1, 2, ... 9, a, b, ... then two characters)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    n, out = i + 1, ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out


def owner_colour(i: int) -> str:
    return CLIENT_COLOURS[i % len(CLIENT_COLOURS)]


def kernel_arrays(n: int, segments: list[list]) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's frame table from ``frame_info`` segments ``[first, count, kind, refs]``: a code
    per frame (NOT_RAM, K_FREE, K_USED, K_SHARED or U_FREE for any user frame) and the refcounts.
    Frames no segment names stay NOT_RAM."""
    kind = np.zeros(n, dtype=np.uint8)
    refs = np.zeros(n, dtype=np.uint32)
    for first, count, k, r in segments:
        kind[first:first + count] = KIND_CODE.get(k, NOT_RAM)
        if r:
            refs[first:first + count] = r
    return kind, refs


# ---- per-order figures ---------------------------------------------------------------------------

def max_order(large_page_sizes: list[int] | tuple[int, ...]) -> int:
    """The highest order shown: the profile's largest large page (10 if it has none)."""
    sizes = [s for s in large_page_sizes if s > 0]
    return (max(sizes).bit_length() - 1 - PAGE_SHIFT) if sizes else 10


def pageblock_order(large_page_sizes: list[int] | tuple[int, ...]) -> int:
    """The order of the mm's block (the profile's smallest large page), as Linux's pageblock_order."""
    sizes = [s for s in large_page_sizes if s > 0]
    return (min(sizes).bit_length() - 1 - PAGE_SHIFT) if sizes else 10


def free_blocks(free: np.ndarray, top: int) -> np.ndarray:
    """Free blocks per order 0..``top`` (int64), buddyinfo-style (see the module docstring):
    ``free`` is a bool per frame."""
    n = int(free.size)
    size = 1 << top
    padded = np.zeros(-(-max(n, 1) // size) * size, dtype=bool)
    padded[:n] = free
    whole = [int(np.count_nonzero(padded))]  # aligned all-free blocks of each order
    level = padded
    for _ in range(top):
        level = level[0::2] & level[1::2]
        whole.append(int(np.count_nonzero(level)))
    out = np.zeros(top + 1, dtype=np.int64)
    for k in range(top):
        out[k] = whole[k] - 2 * whole[k + 1]
    out[top] = whole[top]
    return out


def extfrag_index(blocks: np.ndarray | list[int], order: int) -> int:
    """Linux's fragmentation index of a request of ``order`` over free blocks per order, in
    thousandths: -1000 (it would succeed), else 0 (no memory) .. 1000 (all fragmentation)."""
    blocks = [int(b) for b in blocks]
    total = sum(blocks)
    if total == 0:
        return 0
    if any(blocks[order:]):
        return -1000
    free_pages = sum(b << k for k, b in enumerate(blocks))
    requested = 1 << order
    return 1000 - (1000 + free_pages * 1000 // requested) // total


def extfrag_all(blocks: np.ndarray | list[int]) -> list[int]:
    return [extfrag_index(blocks, k) for k in range(len(blocks))]


def fmt_extfrag(v: int) -> str:
    """As Linux's debugfs prints it: -1.000, 0.000 .. 1.000."""
    sign = "-" if v < 0 else ""
    return f"{sign}{abs(v) // 1000}.{abs(v) % 1000:03d}"


def order_size(k: int) -> str:
    """The size of a block of order ``k``: 4K, 8K, ... 1M, 2M, ... 1G."""
    b = 1 << (k + PAGE_SHIFT)
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if b >= 1 << shift:
            return f"{b >> shift}{unit}"
    return f"{b}B"
