//! The negative suite: requests Xen must refuse (and two it must accept),
//! sent through the raw hypercall paths, each reporting the result it got.
//! The guest kernel runs it under real Xen, the host runs it against the
//! model (`model::ModelNegativeEnv`, feature `model`); the two lists of
//! `NEGATIVE <name> <errno-name> <errno>` lines must be identical.
//!
//! Invariant: every case leaves the environment as it found it: each table
//! it pinned is unpinned, each scratch entry it set is cleared, each frame
//! whose alias it made read-only is writable again, whatever the hypervisor
//! answered. No case depends on the domain's I/O privileges, so an
//! unprivileged domain and dom0 give the same list.

use core::fmt;

use hypercall::abi::{mmu_update, mmuext_op, MMU_MACHPHYS_UPDATE, MMU_NORMAL_PT_UPDATE};
use hypercall::{MmuExt, MmuHypercalls, PinLevel, XenError};

use crate::entry::Flags;
use crate::phys::{FrameMap, PhysMem};
use crate::types::{Mfn, Pfn, ENTRIES, ENTRY_FRAME_MASK, XEN_HOLE};

/// Frames the suite allocates from [`NegativeEnv::allocate_frame`].
pub const FRAMES_NEEDED: usize = 6;

const P: u64 = Flags::PRESENT.bits();
const RW: u64 = Flags::WRITABLE.bits();
const PCD: u64 = Flags::NO_CACHE.bits();
const PSE: u64 = Flags::HUGE_PAGE.bits();
const G: u64 = Flags::GLOBAL.bits();

/// What the suite needs from its environment.
pub trait NegativeEnv {
    /// The hypercalls (real Xen or the model).
    fn hypercalls(&mut self) -> &mut dyn MmuHypercalls;
    /// The guest's frames.
    fn phys_mem(&self) -> &dyn PhysMem;
    /// pfn ↔ mfn.
    fn frame_map(&self) -> &dyn FrameMap;
    /// A fresh frame the suite may use as it likes until the end of the run
    /// (its contents are unspecified; the suite zeroes it), mapped writable
    /// in the guest's own aliases.
    fn allocate_frame(&mut self) -> Option<Pfn>;
    /// Gives back a frame from [`NegativeEnv::allocate_frame`] at the end
    /// of the run, writable again.
    fn free_frame(&mut self, _pfn: Pfn) {}
    /// Makes the guest's own mapping(s) of `pfn` read-only (`false`) or
    /// writable again (`true`), so Xen lets the frame become (or stop being)
    /// a page table. An environment without such aliases does nothing.
    fn set_alias_writable(&mut self, pfn: Pfn, writable: bool) -> Result<(), XenError>;
    /// Machine frame of the L4 currently loaded (`NEW_BASEPTR`).
    fn current_root(&self) -> Mfn;
}

/// One line of output: `NEGATIVE <name> <errno-name> <errno>`, or
/// `NEGATIVE <name> OK 0` when the request was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// Case name.
    pub name: &'a str,
    /// What the hypervisor answered.
    pub result: Result<(), XenError>,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.result {
            Ok(()) => write!(f, "NEGATIVE {} OK 0", self.name),
            Err(e) => write!(f, "NEGATIVE {} {} {}", self.name, e.name(), e.errno()),
        }
    }
}

/// Every case in the order [`run`] reports them, with the answer Xen 4.17
/// gives (from reading `xen/arch/x86/mm.c`; see `docs/xen-pv-rules.md`).
pub const EXPECTED: &[(&str, Result<(), XenError>)] = &[
    ("map-pinned-l1-rw", Err(XenError::Busy)),
    ("map-pinned-l2-rw", Err(XenError::Busy)),
    ("map-pinned-l3-rw", Err(XenError::Busy)),
    ("map-pinned-l4-rw", Err(XenError::Busy)),
    ("map-live-root-rw", Err(XenError::Busy)),
    ("pin-l1-maps-itself-rw", Err(XenError::Busy)),
    ("pin-l2-via-l1-mapping-it-rw", Err(XenError::Busy)),
    ("hook-l1-maps-itself-rw", Err(XenError::Busy)),
    ("hook-l1-mapped-rw", Err(XenError::Inval)),
    ("pin-l1-mapped-rw", Err(XenError::Inval)),
    ("pin-twice", Err(XenError::Inval)),
    ("pin-wrong-level", Err(XenError::Inval)),
    ("pin-foreign", Err(XenError::Inval)),
    ("unpin-unpinned", Err(XenError::Inval)),
    ("unpin-live-root", Ok(())),
    ("l4-self-map-rw", Err(XenError::Inval)),
    ("l4-self-map-ro", Ok(())),
    ("l4-xen-slot", Err(XenError::Inval)),
    ("l4-pcd", Err(XenError::Inval)),
    ("l3-global", Err(XenError::Inval)),
    ("l2-pse", Err(XenError::Inval)),
    ("l1-foreign", Err(XenError::Busy)),
    ("l2-foreign", Err(XenError::Inval)),
    ("new-baseptr-l1", Err(XenError::Inval)),
    ("new-baseptr-foreign", Err(XenError::Inval)),
    ("mmu-update-bad-cmd", Err(XenError::NoSys)),
    ("mmuext-bad-cmd", Err(XenError::NoSys)),
    ("mmu-update-foreign-table", Err(XenError::Inval)),
    ("machphys-foreign", Err(XenError::Inval)),
    ("uvm-unmapped", Err(XenError::Inval)),
    ("uvm-xen-hole", Err(XenError::Inval)),
];

/// The suite's frames: `s` is a scratch L1, pinned for the whole run, whose
/// entry 0 the cases write; `a`..`e` are per-case frames.
struct Frames {
    pfn: [Pfn; FRAMES_NEEDED],
    mfn: [u64; FRAMES_NEEDED],
}

const S: usize = 0;
const A: usize = 1;
const B: usize = 2;
const C: usize = 3;
const D: usize = 4;
const E: usize = 5;

struct Suite<'e> {
    env: &'e mut dyn NegativeEnv,
    f: Frames,
    foreign: u64,
}

impl Suite<'_> {
    fn maddr(&self, frame: usize, index: usize) -> u64 {
        (self.f.mfn[frame] << 12) + (index as u64) * 8
    }

    fn pte(&self, frame: usize, flags: u64) -> u64 {
        (self.f.mfn[frame] << 12) | flags
    }

    fn mmu(&mut self, ptr: u64, val: u64) -> Result<(), XenError> {
        self.env
            .hypercalls()
            .mmu_update(&[mmu_update { ptr, val }])
            .map_err(|e| e.error)
    }

    fn set(&mut self, frame: usize, index: usize, val: u64) -> Result<(), XenError> {
        let ptr = self.maddr(frame, index) | u64::from(MMU_NORMAL_PT_UPDATE);
        self.mmu(ptr, val)
    }

    fn ext(&mut self, op: MmuExt) -> Result<(), XenError> {
        self.env
            .hypercalls()
            .mmuext_op(&[op.encode()])
            .map_err(|e| e.error)
    }

    fn pin(&mut self, frame: usize, level: PinLevel) -> Result<(), XenError> {
        let mfn = self.f.mfn[frame];
        self.ext(MmuExt::Pin { level, mfn })
    }

    fn unpin(&mut self, frame: usize) {
        let mfn = self.f.mfn[frame];
        let _ = self.ext(MmuExt::Unpin { mfn });
    }

    /// Gives `frame` exactly `entries` (all else zero) while its alias is
    /// writable, then makes the alias read-only so it may become a table.
    fn prepare(&mut self, frame: usize, entries: &[(usize, u64)]) -> Result<(), XenError> {
        let pfn = self.f.pfn[frame];
        self.env.set_alias_writable(pfn, true)?;
        let ptr = self.env.phys_mem().frame_ptr(pfn).ok_or(XenError::Fault)?;
        for i in 0..ENTRIES {
            let val = entries
                .iter()
                .find(|(index, _)| *index == i)
                .map_or(0, |(_, v)| *v);
            // SAFETY: `ptr` is valid for 4 KiB of writes (PhysMem contract):
            // the frame is ours, not a live table, and its alias is writable.
            unsafe { ptr.as_ptr().cast::<u64>().add(i).write_volatile(val) };
        }
        self.env.set_alias_writable(pfn, false)
    }

    /// Makes `frame`'s alias writable again (after its table use ended).
    fn release(&mut self, frame: usize) {
        let pfn = self.f.pfn[frame];
        let _ = self.env.set_alias_writable(pfn, true);
    }

    /// Reads entry `index` of the current root.
    fn root_entry(&self, index: usize) -> Option<u64> {
        let root = self.env.current_root();
        let pfn = self.env.frame_map().to_pfn(root)?;
        let ptr = self.env.phys_mem().frame_ptr(pfn)?;
        // SAFETY: `ptr` is valid for 4 KiB of reads (PhysMem contract).
        Some(unsafe { ptr.as_ptr().cast::<u64>().add(index).read_volatile() })
    }

    /// Writes `S[0] = val`, expects a refusal, clears `S[0]` whatever
    /// happened.
    fn scratch(&mut self, val: u64) -> Result<(), XenError> {
        let r = self.set(S, 0, val);
        let _ = self.set(S, 0, 0);
        r
    }

    /// Pins `A` as an empty table of `level` and maps it writable from `S`.
    fn map_pinned_rw(&mut self, level: PinLevel) -> Result<(), XenError> {
        self.prepare(A, &[])?;
        let r = match self.pin(A, level) {
            Ok(()) => {
                let val = self.pte(A, P | RW);
                let r = self.scratch(val);
                self.unpin(A);
                r
            }
            Err(e) => Err(e),
        };
        self.release(A);
        r
    }
}

fn case(out: &mut dyn FnMut(&str, Result<(), XenError>), name: &str, r: Result<(), XenError>) {
    out(name, r);
}

/// Runs every case against `env` and reports each result through `out`, in
/// the order of [`EXPECTED`]. If the environment cannot provide the frames,
/// reports a single `setup` line with the error.
pub fn run(env: &mut dyn NegativeEnv, out: &mut dyn FnMut(&str, Result<(), XenError>)) {
    let mut pfn = [Pfn(0); FRAMES_NEEDED];
    let mut mfn = [0u64; FRAMES_NEEDED];
    for i in 0..FRAMES_NEEDED {
        let Some(p) = env.allocate_frame() else {
            for &p in &pfn[..i] {
                env.free_frame(p);
            }
            out("setup", Err(XenError::NoMem));
            return;
        };
        pfn[i] = p;
        match env.frame_map().to_mfn(p) {
            Some(m) => mfn[i] = m.0,
            None => {
                for &p in &pfn[..=i] {
                    env.free_frame(p);
                }
                out("setup", Err(XenError::Inval));
                return;
            }
        }
    }
    let mut suite = Suite {
        env,
        f: Frames { pfn, mfn },
        foreign: 0,
    };
    // A frame the guest does not own: what the root's L4 slot 261 (Xen's
    // own image mappings) points to.
    suite.foreign = suite
        .root_entry(261)
        .map_or(0, |e| (e & ENTRY_FRAME_MASK) >> 12);
    let setup = suite
        .prepare(S, &[])
        .and_then(|()| suite.pin(S, PinLevel::L1));
    if let Err(e) = setup {
        suite.release(S);
        out("setup", Err(e));
    } else {
        cases(&mut suite, out);
        suite.unpin(S);
        suite.release(S);
    }
    for p in pfn {
        suite.env.free_frame(p);
    }
}

fn cases(s: &mut Suite<'_>, out: &mut dyn FnMut(&str, Result<(), XenError>)) {
    let r = s.map_pinned_rw(PinLevel::L1);
    case(out, "map-pinned-l1-rw", r);
    let r = s.map_pinned_rw(PinLevel::L2);
    case(out, "map-pinned-l2-rw", r);
    let r = s.map_pinned_rw(PinLevel::L3);
    case(out, "map-pinned-l3-rw", r);
    let r = s.map_pinned_rw(PinLevel::L4);
    case(out, "map-pinned-l4-rw", r);

    let root = s.env.current_root().0;
    let r = s.scratch((root << 12) | P | RW);
    case(out, "map-live-root-rw", r);

    // An L1 whose entry 0 maps the L1 itself writable.
    let self_rw = s.pte(A, P | RW);
    let r = s.prepare(A, &[(0, self_rw)]).and_then(|()| {
        let r = s.pin(A, PinLevel::L1);
        if r.is_ok() {
            s.unpin(A);
        }
        r
    });
    s.release(A);
    case(out, "pin-l1-maps-itself-rw", r);

    // L2 A -> L1 B, and B maps A writable.
    let (a_rw, b_link) = (s.pte(A, P | RW), s.pte(B, P | RW));
    let r = s
        .prepare(B, &[(0, a_rw)])
        .and_then(|()| s.prepare(A, &[(0, b_link)]))
        .and_then(|()| {
            let r = s.pin(A, PinLevel::L2);
            if r.is_ok() {
                s.unpin(A);
            }
            r
        });
    s.release(A);
    s.release(B);
    case(out, "pin-l2-via-l1-mapping-it-rw", r);

    // Hooking, into a pinned L2, an L1 that maps itself writable.
    let b_self = s.pte(B, P | RW);
    let r = s
        .prepare(A, &[])
        .and_then(|()| s.prepare(B, &[(0, b_self)]))
        .and_then(|()| s.pin(A, PinLevel::L2))
        .and_then(|()| {
            let link = s.pte(B, P | RW);
            let r = s.set(A, 0, link);
            let _ = s.set(A, 0, 0);
            s.unpin(A);
            r
        });
    s.release(A);
    s.release(B);
    case(out, "hook-l1-maps-itself-rw", r);

    // Hooking an L1 that is mapped writable (from S).
    let r = s
        .prepare(A, &[])
        .and_then(|()| s.prepare(B, &[]))
        .and_then(|()| s.pin(A, PinLevel::L2))
        .and_then(|()| {
            let map_b = s.pte(B, P | RW);
            let r = s.set(S, 0, map_b).and_then(|()| {
                let link = s.pte(B, P | RW);
                let r = s.set(A, 0, link);
                let _ = s.set(A, 0, 0);
                r
            });
            let _ = s.set(S, 0, 0);
            s.unpin(A);
            r
        });
    s.release(A);
    s.release(B);
    case(out, "hook-l1-mapped-rw", r);

    // Pinning a frame that is mapped writable (from S).
    let r = s.prepare(B, &[]).and_then(|()| {
        let map_b = s.pte(B, P | RW);
        let r = s.set(S, 0, map_b).and_then(|()| {
            let r = s.pin(B, PinLevel::L1);
            if r.is_ok() {
                s.unpin(B);
            }
            r
        });
        let _ = s.set(S, 0, 0);
        r
    });
    s.release(B);
    case(out, "pin-l1-mapped-rw", r);

    let r = s
        .prepare(A, &[])
        .and_then(|()| s.pin(A, PinLevel::L1))
        .and_then(|()| {
            let r = s.pin(A, PinLevel::L1);
            if r.is_ok() {
                s.unpin(A);
            }
            s.unpin(A);
            r
        });
    s.release(A);
    case(out, "pin-twice", r);

    let r = s
        .prepare(A, &[])
        .and_then(|()| s.pin(A, PinLevel::L1))
        .and_then(|()| {
            let r = s.pin(A, PinLevel::L2);
            if r.is_ok() {
                s.unpin(A);
            }
            s.unpin(A);
            r
        });
    s.release(A);
    case(out, "pin-wrong-level", r);

    let foreign = s.foreign;
    let r = s.ext(MmuExt::Pin {
        level: PinLevel::L1,
        mfn: foreign,
    });
    case(out, "pin-foreign", r);

    let r = s.prepare(A, &[]).and_then(|()| {
        let mfn = s.f.mfn[A];
        s.ext(MmuExt::Unpin { mfn })
    });
    s.release(A);
    case(out, "unpin-unpinned", r);

    // Xen lets the live root be unpinned: CR3 holds its own type reference.
    let r = s.ext(MmuExt::Unpin { mfn: root });
    if r.is_ok() {
        let _ = s.ext(MmuExt::Pin {
            level: PinLevel::L4,
            mfn: root,
        });
    }
    case(out, "unpin-live-root", r);

    // L4 cases on a pinned, empty, non-live L4 in C (D an empty L3 frame).
    let r = s.prepare(C, &[]).and_then(|()| s.pin(C, PinLevel::L4));
    match r {
        Err(e) => {
            for name in ["l4-self-map-rw", "l4-self-map-ro", "l4-xen-slot", "l4-pcd"] {
                case(out, name, Err(e));
            }
        }
        Ok(()) => {
            let v = s.pte(C, P | RW);
            let r = s.set(C, 0, v);
            let _ = s.set(C, 0, 0);
            case(out, "l4-self-map-rw", r);
            let v = s.pte(C, P);
            let r = s.set(C, 0, v);
            let _ = s.set(C, 0, 0);
            case(out, "l4-self-map-ro", r);
            let r = s.prepare(D, &[]).and_then(|()| {
                let v = s.pte(D, P | RW);
                let r = s.set(C, 256, v);
                let _ = s.set(C, 256, 0);
                r
            });
            case(out, "l4-xen-slot", r);
            let v = s.pte(D, P | RW | PCD);
            let r = s.set(C, 0, v);
            let _ = s.set(C, 0, 0);
            case(out, "l4-pcd", r);
            s.unpin(C);
            s.release(D);
        }
    }
    s.release(C);

    // L3 D with an empty L2 frame E behind a global bit.
    let r = s
        .prepare(D, &[])
        .and_then(|()| s.prepare(E, &[]))
        .and_then(|()| s.pin(D, PinLevel::L3))
        .and_then(|()| {
            let v = s.pte(E, P | RW | G);
            let r = s.set(D, 0, v);
            let _ = s.set(D, 0, 0);
            s.unpin(D);
            r
        });
    s.release(D);
    s.release(E);
    case(out, "l3-global", r);

    // L2 E with a 2 MiB superpage entry.
    let r = s
        .prepare(E, &[])
        .and_then(|()| s.pin(E, PinLevel::L2))
        .and_then(|()| {
            let v = ((s.f.mfn[A] & !511) << 12) | P | RW | PSE;
            let r = s.set(E, 0, v);
            let _ = s.set(E, 0, 0);
            s.unpin(E);
            r
        });
    s.release(E);
    case(out, "l2-pse", r);

    let r = s.scratch((foreign << 12) | P);
    case(out, "l1-foreign", r);

    let r = s
        .prepare(E, &[])
        .and_then(|()| s.pin(E, PinLevel::L2))
        .and_then(|()| {
            let r = s.set(E, 0, (foreign << 12) | P);
            let _ = s.set(E, 0, 0);
            s.unpin(E);
            r
        });
    s.release(E);
    case(out, "l2-foreign", r);

    let r = s
        .prepare(A, &[])
        .and_then(|()| s.pin(A, PinLevel::L1))
        .and_then(|()| {
            let mfn = s.f.mfn[A];
            let r = s.ext(MmuExt::NewBaseptr { mfn });
            if r.is_ok() {
                let _ = s.ext(MmuExt::NewBaseptr { mfn: root });
            }
            s.unpin(A);
            r
        });
    s.release(A);
    case(out, "new-baseptr-l1", r);

    let r = s.ext(MmuExt::NewBaseptr { mfn: foreign });
    if r.is_ok() {
        let _ = s.ext(MmuExt::NewBaseptr { mfn: root });
    }
    case(out, "new-baseptr-foreign", r);

    // Command 7 in the low bits of ptr is not an mmu_update command.
    let ptr = s.maddr(S, 0) | 7;
    let r = s.mmu(ptr, 0);
    case(out, "mmu-update-bad-cmd", r);

    let mut op: mmuext_op = MmuExt::TlbFlushLocal.encode();
    op.cmd = 0x7fff;
    let r = s.env.hypercalls().mmuext_op(&[op]).map_err(|e| e.error);
    case(out, "mmuext-bad-cmd", r);

    let r = s.mmu((foreign << 12) | u64::from(MMU_NORMAL_PT_UPDATE), 0);
    case(out, "mmu-update-foreign-table", r);

    let r = s.mmu((foreign << 12) | u64::from(MMU_MACHPHYS_UPDATE), 0);
    case(out, "machphys-foreign", r);

    // A lower-half address whose L4 slot in the live root is empty.
    let empty_slot = (1..256).find(|&i| s.root_entry(i).is_some_and(|e| e & P == 0));
    let r = match empty_slot {
        Some(slot) => s
            .env
            .hypercalls()
            .update_va_mapping((slot as u64) << 39, 0, 0),
        None => Err(XenError::NoEnt),
    };
    case(out, "uvm-unmapped", r);

    let r = s
        .env
        .hypercalls()
        .update_va_mapping(XEN_HOLE.0 + 0x1000, 0, 0);
    case(out, "uvm-xen-hole", r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DomainKind, ModelNegativeEnv};
    use alloc::string::{String, ToString};
    use alloc::vec::Vec;

    type Answers = Vec<(String, Result<(), XenError>)>;

    fn results(kind: DomainKind) -> (Answers, ModelNegativeEnv) {
        let mut env = ModelNegativeEnv::new(kind, 4096).unwrap();
        let mut got = Vec::new();
        run(&mut env, &mut |name, r| got.push((name.to_string(), r)));
        (got, env)
    }

    #[test]
    fn model_gives_the_expected_answers() {
        let (got, _) = results(DomainKind::Hardware);
        let want: Answers = EXPECTED.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        assert_eq!(got, want);
        assert!(want.iter().filter(|(_, r)| r.is_err()).count() >= 12);
    }

    #[test]
    fn privilege_does_not_change_the_list() {
        assert_eq!(
            results(DomainKind::Hardware).0,
            results(DomainKind::Unprivileged).0
        );
    }

    #[test]
    fn every_case_cleans_up() {
        let mut env = ModelNegativeEnv::new(DomainKind::Hardware, 4096).unwrap();
        let root = env.model().current_root().unwrap();
        let tables = env.model().live_tables();
        let root_count = env.model().type_count(root);
        let mut n = 0;
        run(&mut env, &mut |_, _| n += 1);
        assert_eq!(n, EXPECTED.len());
        let m = env.model();
        assert_eq!(m.current_root(), Some(root));
        assert_eq!(m.live_tables(), tables);
        assert_eq!(m.type_count(root), root_count);
        assert!(m.is_pinned(root));
        assert_eq!(m.check_integrity(), Ok(()));
        // Running it twice gives the same answers.
        let (again, _) = results(DomainKind::Hardware);
        let mut second = Vec::new();
        run(&mut env, &mut |name, r| second.push((name.to_string(), r)));
        assert_eq!(again, second);
    }

    #[test]
    fn line_format() {
        let l = Line {
            name: "x",
            result: Err(XenError::Busy),
        };
        assert_eq!(l.to_string(), "NEGATIVE x EBUSY 16");
        let l = Line {
            name: "y",
            result: Ok(()),
        };
        assert_eq!(l.to_string(), "NEGATIVE y OK 0");
    }
}
