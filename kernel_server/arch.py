"""Architecture profiles: page sizes, page-table shape, user space, kernel eligibility.

A profile describes the page-table tree as a list of *entry shifts* from the
root down: the virtual-address shift that one entry of a table at that level
covers. i686 is ``[22, 12]`` (a page directory entry covers 4 MiB, a page
table entry 4 KiB). A large page is a mapping made directly by an entry at a
level whose shift is above 12 (i686 PSE: 4 MiB at level 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import PAGE_SHIFT, PAGE_SIZE

__all__ = ["PAGE_SHIFT", "PAGE_SIZE", "PROFILES", "Profile", "get_profile"]


@dataclass(frozen=True)
class Profile:
    name: str
    entry_shifts: tuple[int, ...]  # root first, leaf (12) last
    table_entries: int  # entries per page table
    user_top: int  # first virtual address beyond user space
    max_phys: int  # first physical address the profile cannot address
    kernel_limit: int | None  # frames at or above this frame number cannot be kernel-owned
    root_is_slab: bool  # the root table is a slab object (PAE PDPT), not a frame
    large_levels: tuple[int, ...]  # levels whose entries may map a large page

    @property
    def levels(self) -> int:
        return len(self.entry_shifts)

    @property
    def large_page_sizes(self) -> list[int]:
        return [1 << self.entry_shifts[lv] for lv in self.large_levels]

    def large_level_for(self, size: int) -> int | None:
        for lv in self.large_levels:
            if 1 << self.entry_shifts[lv] == size:
                return lv
        return None

    def pages_at(self, level: int) -> int:
        """4 KiB pages covered by one entry at ``level``."""
        return 1 << (self.entry_shifts[level] - PAGE_SHIFT)


PROFILES: dict[str, Profile] = {
    "i686": Profile(
        name="i686",
        entry_shifts=(22, 12),
        table_entries=1024,
        user_top=0xC000_0000,
        max_phys=1 << 32,
        kernel_limit=None,
        root_is_slab=False,
        large_levels=(0,),  # 4 MiB with PSE
    ),
    "i686-pae": Profile(
        name="i686-pae",
        entry_shifts=(30, 21, 12),
        table_entries=512,
        user_top=0xC000_0000,
        max_phys=1 << 36,
        kernel_limit=(1 << 32) >> PAGE_SHIFT,  # the PDPT must be addressable by 32-bit CR3
        root_is_slab=True,  # the PDPT is a 32-byte slab object
        large_levels=(1,),  # 2 MiB
    ),
    "x86_64": Profile(
        name="x86_64",
        entry_shifts=(39, 30, 21, 12),
        table_entries=512,
        user_top=0x0000_8000_0000_0000,
        max_phys=1 << 46,
        kernel_limit=None,
        root_is_slab=False,
        large_levels=(2, 1),  # 2 MiB and 1 GiB
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(PROFILES)}") from None
