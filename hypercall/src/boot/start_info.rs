//! Xen PV `start_info`, checked field by field before the kernel uses it.
//!
//! What Xen maps for a PV guest at entry: pseudo-physical frames `0..n` at
//! `virt_base + pfn * 4096`, where `n` is at least the end of the bootstrap
//! area (the page tables at `pt_base`, then one boot-stack page). The p2m
//! list, `start_info` itself and (without `SIF_MOD_START_PFN`) the module lie
//! inside that area.
//!
//! Invariant: a [`PvLayout`] exists only for a `start_info` whose magic is
//! right and whose every range the kernel will touch — the p2m list, the
//! page tables, the module, a separately placed p2m — was computed without
//! overflow and lies inside what Xen mapped (or, for frame ranges, inside
//! `nr_pages`). Any other `start_info` gives a [`StartInfoError`] that names
//! the field.

use core::fmt;

use crate::abi::{start_info, SIF_INITDOMAIN, SIF_MOD_START_PFN, SIF_PRIVILEGED};
use crate::boot::cmdline::Cmdline;

/// What a 64-bit PV `start_info.magic` starts with (Xen writes
/// `xen-<major>.<minor>-x86_64`; the ABI version is 3.0).
pub const START_INFO_MAGIC: &[u8] = b"xen-3.0-x86_64";

/// Most frames a PV domain can have: 2^52 bytes of physical address space.
pub const MAX_NR_PAGES: u64 = 1 << 40;

const PAGE_SIZE: u64 = 4096;

/// The fields of `start_info`, copied out of Xen's page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartInfoFields {
    /// `magic`.
    pub magic: [u8; 32],
    /// Frames the domain has.
    pub nr_pages: u64,
    /// Machine address of the shared-info page.
    pub shared_info: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Xenstore ring MFN (domU).
    pub store_mfn: u64,
    /// Xenstore event channel (domU).
    pub store_evtchn: u32,
    /// Console ring MFN (domU; meaningless for dom0).
    pub console_mfn: u64,
    /// Console event channel (domU).
    pub console_evtchn: u32,
    /// Virtual address of the bootstrap L4.
    pub pt_base: u64,
    /// Frames of bootstrap page tables.
    pub nr_pt_frames: u64,
    /// Virtual address of the p2m list.
    pub mfn_list: u64,
    /// Module start: a virtual address, or a PFN with `SIF_MOD_START_PFN`.
    pub mod_start: u64,
    /// Module length in bytes.
    pub mod_len: u64,
    /// `cmd_line`, as Xen wrote it.
    pub cmd_line: [u8; 1024],
    /// First PFN of a separately placed p2m list (0 if none).
    pub first_p2m_pfn: u64,
    /// Frames of that p2m list.
    pub nr_p2m_frames: u64,
}

impl StartInfoFields {
    /// Copies the fields out of Xen's `start_info`.
    pub fn from_abi(s: &start_info) -> Self {
        // SAFETY: both arms of the `console` union are plain integers, so
        // reading the domU arm is defined whatever Xen wrote (for dom0 the
        // values are simply not used as a ring).
        let (console_mfn, console_evtchn) = unsafe { (s.console.domU.mfn, s.console.domU.evtchn) };
        StartInfoFields {
            magic: s.magic.map(|c| c as u8),
            nr_pages: s.nr_pages,
            shared_info: s.shared_info,
            flags: s.flags,
            store_mfn: s.store_mfn,
            store_evtchn: s.store_evtchn,
            console_mfn,
            console_evtchn,
            pt_base: s.pt_base,
            nr_pt_frames: s.nr_pt_frames,
            mfn_list: s.mfn_list,
            mod_start: s.mod_start,
            mod_len: s.mod_len,
            cmd_line: s.cmd_line.map(|c| c as u8),
            first_p2m_pfn: s.first_p2m_pfn,
            nr_p2m_frames: s.nr_p2m_frames,
        }
    }

    /// The command line.
    pub fn cmdline(&self) -> Cmdline {
        Cmdline::from_nul_terminated(&self.cmd_line)
    }

    /// Whether this is dom0.
    pub fn is_dom0(&self) -> bool {
        self.flags & SIF_INITDOMAIN != 0
    }

    /// Whether Xen built this domain privileged (`SIF_PRIVILEGED` or
    /// `SIF_INITDOMAIN`): dom0, which holds I/O memory and port
    /// capabilities, so Xen lets it put cache attributes in its L1 entries
    /// and flush caches (`MMUEXT_FLUSH_CACHE*`).
    pub fn is_privileged(&self) -> bool {
        self.flags & (SIF_PRIVILEGED | SIF_INITDOMAIN) != 0
    }
}

/// A start_info field that cannot be right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    /// `magic` is not a 64-bit PV start_info's.
    BadMagic([u8; 32]),
    /// `nr_pages` is 0 or more than [`MAX_NR_PAGES`].
    BadNrPages(u64),
    /// `start_info` itself is not page-aligned inside the mapped area.
    StartInfoNotMapped {
        /// Its virtual address.
        va: u64,
    },
    /// `pt_base` is below `virt_base`, not page-aligned, or the bootstrap
    /// area it starts goes past `nr_pages`.
    BadPageTables {
        /// `pt_base`.
        pt_base: u64,
        /// `nr_pt_frames`.
        nr_pt_frames: u64,
    },
    /// The p2m list (`nr_pages` entries at `mfn_list`) is misaligned or not
    /// inside the mapped area.
    P2mNotMapped {
        /// `mfn_list`.
        mfn_list: u64,
        /// Its length in bytes.
        bytes: u64,
    },
    /// The separately placed p2m frames go past `nr_pages` or are too few
    /// for `nr_pages` entries.
    BadP2mFrames {
        /// `first_p2m_pfn`.
        first: u64,
        /// `nr_p2m_frames`.
        count: u64,
    },
    /// The module's range overflows or goes past what the domain has.
    BadModule {
        /// `mod_start`.
        start: u64,
        /// `mod_len`.
        len: u64,
    },
    /// A domU's console ring frame is not one of the domain's frames.
    ConsoleNotOwned {
        /// `console.domU.mfn`.
        mfn: u64,
    },
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartInfoError::BadMagic(magic) => {
                let end = magic.iter().position(|&b| b == 0).unwrap_or(magic.len());
                write!(
                    f,
                    "start_info magic is {:?}, not \"xen-3.0-x86_64\"",
                    magic[..end].escape_ascii()
                )
            }
            StartInfoError::BadNrPages(n) => {
                write!(
                    f,
                    "start_info nr_pages {n:#x} is 0 or above {MAX_NR_PAGES:#x}"
                )
            }
            StartInfoError::StartInfoNotMapped { va } => write!(
                f,
                "start_info at {va:#x} is not a page inside the start-of-day mapping"
            ),
            StartInfoError::BadPageTables {
                pt_base,
                nr_pt_frames,
            } => write!(
                f,
                "start_info pt_base {pt_base:#x} with {nr_pt_frames} frames is not a page-aligned \
                 area inside the domain's frames above virt_base"
            ),
            StartInfoError::P2mNotMapped { mfn_list, bytes } => write!(
                f,
                "start_info mfn_list {mfn_list:#x} ({bytes:#x} bytes) is misaligned or outside the \
                 start-of-day mapping"
            ),
            StartInfoError::BadP2mFrames { first, count } => write!(
                f,
                "start_info p2m frames [{first:#x}, +{count:#x}) are outside nr_pages or too few"
            ),
            StartInfoError::BadModule { start, len } => write!(
                f,
                "start_info module at {start:#x} ({len:#x} bytes) overflows or lies outside the \
                 domain's frames"
            ),
            StartInfoError::ConsoleNotOwned { mfn } => {
                write!(f, "start_info console mfn {mfn:#x} is not in the p2m list")
            }
        }
    }
}

/// Where things are, from a `start_info` that passed [`validate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvLayout {
    /// Frames the domain has.
    pub nr_pages: u64,
    /// First PFN of the bootstrap page tables.
    pub pt_first_pfn: u64,
    /// One past the bootstrap area: the tables and one boot-stack page.
    /// Frames `[0, bootstrap_end_pfn)` are mapped at `virt_base`.
    pub bootstrap_end_pfn: u64,
    /// The p2m list's virtual address (`nr_pages` entries of 8 bytes).
    pub p2m_va: u64,
    /// Separately placed p2m frames `[first, end)`, if any.
    pub p2m_frames: Option<(u64, u64)>,
    /// The module's frames `[first, end)`, if there is a module.
    pub module_pfns: Option<(u64, u64)>,
}

/// Checks `fields` (of the `start_info` at virtual `start_info_va`) for a
/// kernel whose start-of-day mapping begins at `virt_base`.
pub fn validate(
    fields: &StartInfoFields,
    start_info_va: u64,
    virt_base: u64,
) -> Result<PvLayout, StartInfoError> {
    let magic_ok = fields.magic.starts_with(START_INFO_MAGIC)
        && fields.magic[START_INFO_MAGIC.len()..].first() == Some(&0);
    if !magic_ok {
        return Err(StartInfoError::BadMagic(fields.magic));
    }
    let nr_pages = fields.nr_pages;
    if nr_pages == 0 || nr_pages > MAX_NR_PAGES {
        return Err(StartInfoError::BadNrPages(nr_pages));
    }
    let va_to_pfn = |va: u64| va.checked_sub(virt_base).map(|off| off / PAGE_SIZE);

    let bad_tables = StartInfoError::BadPageTables {
        pt_base: fields.pt_base,
        nr_pt_frames: fields.nr_pt_frames,
    };
    let pt_first_pfn = va_to_pfn(fields.pt_base)
        .filter(|_| fields.pt_base % PAGE_SIZE == 0 && fields.nr_pt_frames >= 1)
        .ok_or(bad_tables)?;
    let bootstrap_end_pfn = pt_first_pfn
        .checked_add(fields.nr_pt_frames)
        .and_then(|end| end.checked_add(1))
        .filter(|&end| end <= nr_pages)
        .ok_or(bad_tables)?;
    let mapped_end = bootstrap_end_pfn
        .checked_mul(PAGE_SIZE)
        .and_then(|bytes| virt_base.checked_add(bytes))
        .ok_or(bad_tables)?;
    let mapped = |start: u64, len: u64| {
        start >= virt_base && start.checked_add(len).is_some_and(|end| end <= mapped_end)
    };

    if start_info_va % PAGE_SIZE != 0 || !mapped(start_info_va, PAGE_SIZE) {
        return Err(StartInfoError::StartInfoNotMapped { va: start_info_va });
    }

    let p2m_bytes = nr_pages * 8;
    if fields.mfn_list % 8 != 0 || !mapped(fields.mfn_list, p2m_bytes) {
        return Err(StartInfoError::P2mNotMapped {
            mfn_list: fields.mfn_list,
            bytes: p2m_bytes,
        });
    }
    let p2m_frames = if fields.nr_p2m_frames == 0 {
        None
    } else {
        let (first, count) = (fields.first_p2m_pfn, fields.nr_p2m_frames);
        let bad = StartInfoError::BadP2mFrames { first, count };
        let end = first
            .checked_add(count)
            .filter(|&end| end <= nr_pages)
            .ok_or(bad)?;
        if count * PAGE_SIZE < p2m_bytes {
            return Err(bad);
        }
        Some((first, end))
    };

    let module_pfns = if fields.mod_len == 0 {
        None
    } else {
        let bad = StartInfoError::BadModule {
            start: fields.mod_start,
            len: fields.mod_len,
        };
        let first = if fields.flags & SIF_MOD_START_PFN != 0 {
            fields.mod_start
        } else {
            if fields.mod_start % PAGE_SIZE != 0 || !mapped(fields.mod_start, fields.mod_len) {
                return Err(bad);
            }
            va_to_pfn(fields.mod_start).ok_or(bad)?
        };
        let end = first
            .checked_add(fields.mod_len.div_ceil(PAGE_SIZE))
            .filter(|&end| end <= nr_pages)
            .ok_or(bad)?;
        Some((first, end))
    };

    Ok(PvLayout {
        nr_pages,
        pt_first_pfn,
        bootstrap_end_pfn,
        p2m_va: fields.mfn_list,
        p2m_frames,
        module_pfns,
    })
}

/// The PFN whose p2m entry is `mfn`, found by scanning the list (no M2P
/// read, which could fault on an mfn that is not the domain's).
pub fn pfn_of(p2m: &[u64], mfn: u64) -> Option<u64> {
    p2m.iter().position(|&m| m == mfn).map(|pfn| pfn as u64)
}

/// Checks a domU's console ring frame against the p2m list and returns its
/// PFN.
pub fn console_pfn(p2m: &[u64], console_mfn: u64) -> Result<u64, StartInfoError> {
    pfn_of(p2m, console_mfn).ok_or(StartInfoError::ConsoleNotOwned { mfn: console_mfn })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    const VIRT_BASE: u64 = 0xffff_ffff_8000_0000;

    /// A start_info as Xen's dom0 builder lays it out for 512 MiB: image,
    /// p2m list, start_info, page tables, stack.
    fn good() -> (StartInfoFields, u64) {
        let mut magic = [0u8; 32];
        magic[..START_INFO_MAGIC.len()].copy_from_slice(START_INFO_MAGIC);
        let nr_pages = 0x20000;
        let fields = StartInfoFields {
            magic,
            nr_pages,
            shared_info: 0x1234_5000,
            flags: SIF_INITDOMAIN,
            store_mfn: 0,
            store_evtchn: 0,
            console_mfn: 0,
            console_evtchn: 0,
            pt_base: VIRT_BASE + 0x3fc * PAGE_SIZE,
            nr_pt_frames: 4,
            mfn_list: VIRT_BASE + 0x13e * PAGE_SIZE,
            mod_start: 0,
            mod_len: 0,
            cmd_line: [0; 1024],
            first_p2m_pfn: 0,
            nr_p2m_frames: 0,
        };
        (fields, VIRT_BASE + 0x23e * PAGE_SIZE)
    }

    #[test]
    fn a_sound_start_info_gives_its_layout() {
        let (f, si) = good();
        let layout = validate(&f, si, VIRT_BASE).unwrap();
        assert_eq!(layout.pt_first_pfn, 0x3fc);
        assert_eq!(layout.bootstrap_end_pfn, 0x3fc + 4 + 1);
        assert_eq!(layout.p2m_va, f.mfn_list);
        assert_eq!(layout.module_pfns, None);
        let with_module = StartInfoFields {
            flags: SIF_MOD_START_PFN,
            mod_start: 0x500,
            mod_len: 0x1001,
            ..f
        };
        assert_eq!(
            validate(&with_module, si, VIRT_BASE).unwrap().module_pfns,
            Some((0x500, 0x502))
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let (f, si) = good();
        let check = |g: StartInfoFields, si: u64| validate(&g, si, VIRT_BASE).unwrap_err();
        let mut bad_magic = f;
        bad_magic.magic[4] = b'4';
        assert!(matches!(check(bad_magic, si), StartInfoError::BadMagic(_)));
        let mut long_magic = f;
        long_magic.magic[14] = b'x';
        assert!(matches!(check(long_magic, si), StartInfoError::BadMagic(_)));
        assert_eq!(
            check(StartInfoFields { nr_pages: 0, ..f }, si),
            StartInfoError::BadNrPages(0)
        );
        assert_eq!(
            check(
                StartInfoFields {
                    nr_pages: u64::MAX,
                    ..f
                },
                si
            ),
            StartInfoError::BadNrPages(u64::MAX)
        );
        // pt_base below virt_base used to become pfn 0 silently.
        assert!(matches!(
            check(
                StartInfoFields {
                    pt_base: 0x1000,
                    ..f
                },
                si
            ),
            StartInfoError::BadPageTables { .. }
        ));
        assert!(matches!(
            check(
                StartInfoFields {
                    nr_pt_frames: u64::MAX,
                    ..f
                },
                si
            ),
            StartInfoError::BadPageTables { .. }
        ));
        assert!(matches!(
            check(
                StartInfoFields {
                    nr_pt_frames: 0x20000,
                    ..f
                },
                si
            ),
            StartInfoError::BadPageTables { .. }
        ));
        // A p2m list longer than the mapped area: its slice would read
        // unmapped memory.
        assert!(matches!(
            check(
                StartInfoFields {
                    mfn_list: VIRT_BASE + 0x3f0 * PAGE_SIZE,
                    ..f
                },
                si
            ),
            StartInfoError::P2mNotMapped { .. }
        ));
        assert!(matches!(
            check(
                StartInfoFields {
                    mfn_list: 0x1000,
                    ..f
                },
                si
            ),
            StartInfoError::P2mNotMapped { .. }
        ));
        assert!(matches!(
            check(
                StartInfoFields {
                    mfn_list: f.mfn_list + 4,
                    ..f
                },
                si
            ),
            StartInfoError::P2mNotMapped { .. }
        ));
        assert_eq!(
            check(f, VIRT_BASE + 0x500 * PAGE_SIZE),
            StartInfoError::StartInfoNotMapped {
                va: VIRT_BASE + 0x500 * PAGE_SIZE
            }
        );
        assert!(matches!(
            check(
                StartInfoFields {
                    first_p2m_pfn: u64::MAX - 1,
                    nr_p2m_frames: 4,
                    ..f
                },
                si
            ),
            StartInfoError::BadP2mFrames { .. }
        ));
        assert!(matches!(
            check(
                StartInfoFields {
                    first_p2m_pfn: 0x1000,
                    nr_p2m_frames: 1,
                    ..f
                },
                si
            ),
            StartInfoError::BadP2mFrames { .. }
        ));
        for (flags, start, len) in [
            (SIF_MOD_START_PFN, u64::MAX, 1),
            (SIF_MOD_START_PFN, 0x1ffff, 0x2000),
            (0, 0x1000, 0x1000),
            (0, VIRT_BASE + 0x100 * PAGE_SIZE, u64::MAX),
            (0, VIRT_BASE + 0x100 * PAGE_SIZE + 1, 0x10),
        ] {
            let g = StartInfoFields {
                flags,
                mod_start: start,
                mod_len: len,
                ..f
            };
            assert_eq!(
                check(g, si),
                StartInfoError::BadModule { start, len },
                "{start:#x} {len:#x}"
            );
        }
        // Tables at the top of the address space: the mapped area would end
        // beyond 2^64.
        assert!(matches!(
            check(
                StartInfoFields {
                    nr_pages: 1 << 20,
                    pt_base: VIRT_BASE + 0x7fff_f000,
                    nr_pt_frames: 1,
                    ..f
                },
                si
            ),
            StartInfoError::BadPageTables { .. }
        ));
        let text = std::format!("{}", check(StartInfoFields { nr_pages: 0, ..f }, si));
        assert!(text.contains("nr_pages"), "{text}");
    }

    #[test]
    fn the_console_frame_must_be_the_domains() {
        let p2m = [7, 9, 11];
        assert_eq!(console_pfn(&p2m, 11), Ok(2));
        assert_eq!(
            console_pfn(&p2m, 12),
            Err(StartInfoError::ConsoleNotOwned { mfn: 12 })
        );
    }

    /// Random fields never panic (no overflow, no out-of-range slice), and
    /// anything accepted keeps every range inside what it claims.
    #[test]
    fn random_start_infos_never_panic_and_accepted_ones_are_in_bounds() {
        let (base, si) = good();
        let mut next = crate::boot::test_rng(0x9e37_79b9_7f4a_7c15u64);
        let mut accepted = 0;
        for _ in 0..200_000 {
            let mut f = base;
            // Perturb a few fields with values near the edges or random.
            for _ in 0..1 + next() % 3 {
                let pick = |r: u64, good: u64| match r % 5 {
                    0 => r,
                    1 => good.wrapping_add(r % 4096),
                    2 => good.wrapping_sub(r % 4096),
                    3 => u64::MAX - r % 16,
                    _ => good,
                };
                let r = next();
                match next() % 8 {
                    0 => f.nr_pages = pick(r, f.nr_pages),
                    1 => f.pt_base = pick(r, f.pt_base),
                    2 => f.nr_pt_frames = pick(r, f.nr_pt_frames),
                    3 => f.mfn_list = pick(r, f.mfn_list),
                    4 => f.mod_start = pick(r, VIRT_BASE + 0x100 * PAGE_SIZE),
                    5 => f.mod_len = pick(r, 0x2000),
                    6 => f.first_p2m_pfn = pick(r, 0x400),
                    _ => f.nr_p2m_frames = pick(r, 0x100),
                }
                if next() % 2 == 0 {
                    f.flags ^= SIF_MOD_START_PFN;
                }
            }
            if let Ok(l) = validate(&f, si, VIRT_BASE) {
                accepted += 1;
                let mapped_end = VIRT_BASE + l.bootstrap_end_pfn * PAGE_SIZE;
                assert!(l.bootstrap_end_pfn <= l.nr_pages && l.nr_pages <= MAX_NR_PAGES);
                assert!(l.p2m_va >= VIRT_BASE && l.p2m_va + l.nr_pages * 8 <= mapped_end);
                if let Some((a, b)) = l.module_pfns {
                    assert!(a < b && b <= l.nr_pages, "{f:?}");
                }
                if let Some((a, b)) = l.p2m_frames {
                    assert!(a < b && b <= l.nr_pages && (b - a) * PAGE_SIZE >= l.nr_pages * 8);
                }
            }
        }
        assert!(
            accepted > 1000,
            "only {accepted} accepted: the test is too hard"
        );
    }
}
