"""The physical memory map the kernel boots from (like a PC's e820 plus Jinue's layout).

A ``BootMap`` is a list of non-overlapping page-aligned regions, each with a
``kind``. What each kind means for ownership at boot:

| kind          | owner  | state  | mappable by users   |
| ------------- | ------ | ------ | ------------------- |
| reserved      | none   | -      | no (not RAM for us) |
| kernel_image  | kernel | in use | read-only (shared)  |
| frame_table   | kernel | in use | no                  |
| kernel_pool   | kernel | free   | no                  |
| ramdisk       | kernel | in use | read-only (shared)  |
| firmware      | kernel | in use | read-only (shared)  |
| user          | user   | free   | when mapped by mm   |

Addresses not covered by any region are holes (not RAM). RAM a profile cannot
address (above its ``max_phys``) is left out of the map, as a real kernel
leaves it unused; ``unaddressable`` says how much.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel_server.arch import PAGE_SHIFT, PAGE_SIZE, Profile

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BYTES_PER_FRAME = 13  # kind (1) + refcount (4) + free-list next (4) + prev (4)
MAX_FRAMES = 1 << 25  # frame-table span limit (128 GiB of 4 KiB frames)
MIN_MEMORY = 4 * MiB

KINDS = ("reserved", "kernel_image", "frame_table", "kernel_pool", "ramdisk", "firmware", "user")
OWNER = {
    "reserved": "none",
    "kernel_image": "kernel",
    "frame_table": "kernel",
    "kernel_pool": "kernel",
    "ramdisk": "kernel",
    "firmware": "kernel",
    "user": "user",
}
SHARED = frozenset(("kernel_image", "ramdisk", "firmware"))
PCI_HOLE = (0xE000_0000, 0x1_0000_0000)  # 3.5 GiB .. 4 GiB: devices, not RAM


@dataclass(frozen=True)
class Region:
    kind: str
    first: int  # frame number
    count: int  # frames

    @property
    def end(self) -> int:
        return self.first + self.count

    def to_wire(self) -> dict:
        return {
            "kind": self.kind,
            "first": self.first,
            "count": self.count,
            "start": self.first << PAGE_SHIFT,
            "size": self.count << PAGE_SHIFT,
            "owner": OWNER[self.kind],
            "shared": self.kind in SHARED,
        }


@dataclass(frozen=True)
class BootMap:
    regions: tuple[Region, ...]  # sorted by first frame
    unaddressable: int = 0  # bytes of RAM left out: beyond what the profile addresses
    max_phys: int | None = None  # the profile's limit, when RAM was left out because of it

    @property
    def span(self) -> int:
        """Frames the frame table must cover (0 .. highest frame + 1)."""
        return max(r.end for r in self.regions)

    def of_kind(self, kind: str) -> list[Region]:
        return [r for r in self.regions if r.kind == kind]

    def to_wire(self) -> list[dict]:
        return [r.to_wire() for r in self.regions]

    def unaddressable_note(self, arch: str) -> str:
        """``"0.5 GiB of RAM above 64 GiB not addressable on i686-pae"``, or "" when all RAM is used."""
        if not self.unaddressable or self.max_phys is None:
            return ""
        return f"{human_size(self.unaddressable)} of RAM above {human_size(self.max_phys)} not addressable on {arch}"


def human_size(nbytes: int) -> str:
    """Bytes in GiB (at least half a GiB) or MiB, with up to two decimals: ``0.5 GiB``, ``96 MiB``."""
    unit, size = ("GiB", GiB) if nbytes >= GiB // 2 else ("MiB", MiB)
    return f"{round(nbytes / size, 2):g} {unit}"


def frames(nbytes: int) -> int:
    return (nbytes + PAGE_SIZE - 1) // PAGE_SIZE


def pc_map(profile: Profile, memory: int, kernel_pool_frames: int | None = None) -> BootMap:
    """A PC-like map for ``memory`` bytes of RAM.

    Low 1 MiB reserved (BIOS, VGA, ROMs); RAM above 3.5 GiB is remapped above
    4 GiB (PCI hole); ACPI tables at the top of low RAM; the kernel image at
    16 MiB as in Jinue (at 1 MiB when RAM is too small for that), followed by
    the frame table, the initial kernel pool and the RAM disk. RAM that lands
    at or above the profile's ``max_phys`` is left out (counted in
    ``unaddressable``): 64 GiB on i686-pae uses the 63.5 GiB below 64 GiB.
    """
    if memory % PAGE_SIZE:
        raise ValueError(f"memory size {memory} is not a multiple of the {PAGE_SIZE}-byte page")
    if memory < MIN_MEMORY:
        raise ValueError(f"memory size {memory} is below the minimum of {MIN_MEMORY // MiB} MiB")
    low_top = min(memory, PCI_HOLE[0], profile.max_phys)
    high = min(memory - min(memory, PCI_HOLE[0]), max(0, profile.max_phys - PCI_HOLE[1]))  # remapped above 4 GiB
    unaddressable = memory - low_top - high
    if low_top < MIN_MEMORY:
        raise ValueError(f"{profile.name} addresses physical memory below {human_size(profile.max_phys)} only: "
                         f"no usable RAM is left of {human_size(memory)}")
    memory = low_top + high  # what the kernel uses
    top = PCI_HOLE[1] + high if high else low_top
    span = frames(top)
    if span > MAX_FRAMES:
        raise ValueError(f"{span} frames exceed the frame-table limit of {MAX_FRAMES} frames")

    tiny = memory < 64 * MiB
    image = frames(512 * KiB)
    table = frames(span * BYTES_PER_FRAME)
    ram_frames = frames(memory)
    pool = kernel_pool_frames if kernel_pool_frames is not None else min(256, ram_frames // 16)
    if pool < 0:
        raise ValueError("kernel pool size cannot be negative")
    ramdisk = frames(64 * KiB if tiny else 1 * MiB)
    firmware = frames(64 * KiB)

    low = frames(1 * MiB)
    base = low if tiny else frames(16 * MiB)
    fw_first = frames(low_top) - firmware
    layout = [("kernel_image", image), ("frame_table", table), ("kernel_pool", pool), ("ramdisk", ramdisk)]
    end = base + sum(n for _, n in layout)
    if end > fw_first:
        raise ValueError(f"{memory // MiB} MiB of RAM is too small for the kernel's boot layout")

    regions = [Region("reserved", 0, low)]
    if base > low:
        regions.append(Region("user", low, base - low))
    at = base
    for kind, n in layout:
        if n:
            regions.append(Region(kind, at, n))
        at += n
    if fw_first > at:
        regions.append(Region("user", at, fw_first - at))
    regions.append(Region("firmware", fw_first, firmware))
    if high:
        regions.append(Region("user", frames(PCI_HOLE[1]), frames(high)))
    return BootMap(tuple(regions), unaddressable, profile.max_phys if unaddressable else None)


def from_json(data: object, profiles: dict[str, Profile]) -> tuple[str, BootMap]:
    """A boot map given as data, ``{"arch": NAME, "regions": [[kind, first frame, frames], ...]}`` (the form
    the test vectors carry): its profile's name and the map. ValueError says what is wrong with it."""
    if not isinstance(data, dict) or set(data) != {"arch", "regions"}:
        raise ValueError('a boot map is {"arch": NAME, "regions": [[kind, first, count], ...]}')
    arch = data["arch"]
    if arch not in profiles:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(profiles)}")
    regions = data["regions"]
    if not isinstance(regions, list) or not regions:
        raise ValueError("regions: a non-empty list of [kind, first frame, frames]")
    out: list[Region] = []
    end = 0
    for i, r in enumerate(regions):
        if not (isinstance(r, list) and len(r) == 3 and r[0] in KINDS and all(type(x) is int for x in r[1:])):
            raise ValueError(f"region {i}: [kind, first frame, frames] with kind one of {', '.join(KINDS)}")
        kind, first, count = r
        if first < end or count < 1:
            raise ValueError(f"region {i}: regions must be in order, not overlap, and hold at least one frame")
        out.append(Region(kind, first, count))
        end = first + count
    if end > MAX_FRAMES or end * PAGE_SIZE > profiles[arch].max_phys:
        raise ValueError(f"the map spans {end} frames: beyond the frame-table limit or what {arch} addresses")
    return arch, BootMap(tuple(out))


_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"256MiB"``, ``"64G"``, ``"4096"`` -> bytes (binary units; ``MB`` means MiB here)."""
    s = text.strip().lower().replace("_", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = s[len(num):].strip()
    if not num or unit not in _UNITS:
        raise ValueError(f"bad size {text!r}: use a number with an optional unit, e.g. 256MiB, 4GiB, 65536")
    try:
        value = float(num) if "." in num else int(num)
    except ValueError:
        raise ValueError(f"bad size {text!r}: {num!r} is not a number") from None
    out = int(value * _UNITS[unit])
    if out <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return out
