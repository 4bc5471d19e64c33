//! pvmmu's negative suite against the real hypervisor: the requests Xen must
//! refuse, sent by this kernel as a Xen PV guest, one
//! `NEGATIVE <name> <errno-name> <errno>` line per case, in the format (and
//! order) of the host's `negative-model` binary. The harness compares the
//! two lists; the run itself never changes the self-test verdict.
//!
//! Invariant: every frame the suite borrows comes from the frame allocator
//! and goes back to it writable in every kernel mapping (direct map and,
//! for frames inside Xen's start-of-day area, the boot-region alias); the
//! live tree is the one the bootstrap built, with its root pinned, before
//! and after the run.

use hypercall::abi::UVMF_INVLPG;
use hypercall::{MmuHypercalls, XenError};
use pvmmu::backend::xen::{Alias, AliasMap, MAX_ALIASES};
use pvmmu::entry::{pv_normalize, Entry, Flags, Level};
use pvmmu::negative::{self, Line, NegativeEnv};
use pvmmu::oracle::{self, OracleEnv};
use pvmmu::{FrameMap, Mfn, Pfn, PhysMem};

use crate::directmap::{DirectMem, KernelAliases};
use crate::frames::Frames;
use crate::xen_pv::PvBoot;
use crate::Kernel;

/// The negative suite's view of this PV guest: real hypercalls, the direct
/// map, the p2m list, and the allocator frames come from.
pub struct XenNegativeEnv<'k> {
    xen: hypercall::Xen,
    mem: DirectMem,
    pv: PvBoot,
    aliases: KernelAliases,
    frames: &'k mut Frames,
    root: Mfn,
    /// The oracle's window frame: its direct-map page is the live-tree
    /// slot the oracle rewrites.
    window: Option<Pfn>,
}

impl<'k> XenNegativeEnv<'k> {
    /// The environment of a PV kernel whose live root is `root`, taking
    /// its frames from `frames`.
    fn new(
        pv: PvBoot,
        mem: DirectMem,
        aliases: KernelAliases,
        frames: &'k mut Frames,
        root: Mfn,
    ) -> Self {
        Self {
            // SAFETY: a `PvBoot` exists only on the Xen PV entry path.
            xen: unsafe { hypercall::Xen::new() },
            mem,
            pv,
            aliases,
            frames,
            root,
            window: None,
        }
    }
}

impl XenNegativeEnv<'_> {
    /// The L1 entry that maps `va` in the live tree; `None` where the walk
    /// finds no 4 KiB leaf.
    fn leaf(&self, va: u64) -> Option<Entry> {
        let mut table = self.pv.to_pfn(self.root)?;
        let mut level = Level::L4;
        loop {
            let index = level.index(va);
            let words = self.mem.frame_ptr(table)?;
            // SAFETY: `DirectMem` frames are valid for 4 KiB of reads; the
            // index is below 512.
            let e = Entry(unsafe { words.as_ptr().cast::<u64>().add(index).read_volatile() });
            if !e.is_present() {
                return None;
            }
            match level.lower() {
                None => return Some(e),
                Some(_) if e.is_huge() => return None,
                Some(lower) => {
                    table = self.pv.to_pfn(e.mfn())?;
                    level = lower;
                }
            }
        }
    }
}

impl NegativeEnv for XenNegativeEnv<'_> {
    fn hypercalls(&mut self) -> &mut dyn MmuHypercalls {
        &mut self.xen
    }

    fn phys_mem(&self) -> &dyn PhysMem {
        &self.mem
    }

    fn frame_map(&self) -> &dyn FrameMap {
        &self.pv
    }

    fn allocate_frame(&mut self) -> Option<Pfn> {
        self.frames.allocate_lowest()
    }

    fn free_frame(&mut self, pfn: Pfn) {
        if let Err(e) = self.frames.try_free(pfn) {
            log::error!("negative suite: frame {pfn:?} not given back: {e:?}");
        }
    }

    /// Rewrites, with `update_va_mapping`, every kernel mapping of `pfn`
    /// (its direct-map page and its boot-region page) with RW as asked,
    /// keeping the other flags the guest gave it.
    fn set_alias_writable(&mut self, pfn: Pfn, writable: bool) -> Result<(), XenError> {
        let mfn = self.pv.to_mfn(pfn).ok_or(XenError::Inval)?;
        let mut out = [Alias::Va(0); MAX_ALIASES];
        let n = self.aliases.aliases(pfn, &mut out).min(MAX_ALIASES);
        for alias in &out[..n] {
            let Alias::Va(va) = *alias else { continue };
            let Some(e) = self.leaf(va) else {
                continue;
            };
            if e.mfn() != mfn || e.flags().contains(Flags::WRITABLE) == writable {
                continue;
            }
            let mut flags = pv_normalize(e.flags());
            flags.set(Flags::WRITABLE, writable);
            let val = Entry::new(mfn, flags).0;
            self.xen.update_va_mapping(va, val, UVMF_INVLPG)?;
        }
        Ok(())
    }

    fn current_root(&self) -> Mfn {
        self.root
    }
}

impl OracleEnv for XenNegativeEnv<'_> {
    /// The direct-map page of a frame taken from the allocator for the
    /// run: nothing else in the kernel uses that address while the frame
    /// is ours (its other alias, if it lies in Xen's start-of-day area, is
    /// left alone), and its L1 entry is a 4 KiB leaf of the live tree.
    fn window_va(&mut self) -> Option<u64> {
        let pfn = match self.window {
            Some(pfn) => pfn,
            None => {
                let pfn = self.frames.allocate_lowest()?;
                self.window = Some(pfn);
                pfn
            }
        };
        let va = self.mem.frame_ptr(pfn)?.as_ptr() as u64;
        self.leaf(va).map(|_| va)
    }
}

/// Runs the negative suite under Xen PV (does nothing and returns `None` on
/// other platforms) and prints one line per case for the harness, which
/// compares them with the model. Each answer is also checked here against
/// `negative::EXPECTED` (expected and got errno per case, an error line per
/// mismatch), so a boot fails by itself: returns how many cases did not
/// answer as expected (missing or extra cases count).
pub fn run(kernel: &mut Kernel) -> Option<usize> {
    let (Some(pv), Some(dm)) = (kernel.pv.clone(), kernel.direct_map.as_ref()) else {
        return None;
    };
    let Some(root) = pv.pfn_to_mfn(dm.root.0).map(Mfn) else {
        crate::kprintln!("NEGATIVE setup EINVAL 22");
        return Some(negative::EXPECTED.len().max(1));
    };
    let (mem, aliases) = (dm.mem, dm.aliases);
    let before = kernel.frames.free_count();
    let mut env = XenNegativeEnv::new(pv, mem, aliases, &mut kernel.frames, root);
    log::info!(
        "negative suite: {} cases against Xen",
        negative::EXPECTED.len()
    );
    let mut seen = 0usize;
    let mut mismatches = 0usize;
    negative::run(&mut env, &mut |name, result| {
        crate::kprintln!("{}", Line { name, result });
        let want = negative::EXPECTED.get(seen).copied();
        seen += 1;
        match want {
            Some((want_name, want_result)) if want_name == name && want_result == result => {}
            Some((want_name, want_result)) => {
                mismatches += 1;
                log::error!(
                    "negative case {seen}: expected {}, got {}",
                    Line {
                        name: want_name,
                        result: want_result
                    },
                    Line { name, result }
                );
            }
            None => {
                mismatches += 1;
                log::error!("negative case {seen} {name}: not in the expected list");
            }
        }
    });
    if seen < negative::EXPECTED.len() {
        log::error!(
            "negative suite: {seen} cases ran, {} expected",
            negative::EXPECTED.len()
        );
        mismatches += negative::EXPECTED.len() - seen;
    }
    log::info!(
        "negative suite: {} of {} cases answered as expected",
        seen - mismatches.min(seen),
        negative::EXPECTED.len()
    );
    let after = kernel.frames.free_count();
    if after != before {
        log::error!("negative suite: {before} free frames before, {after} after");
        mismatches += 1;
    }
    Some(mismatches)
}

/// A line of at most 256 bytes, formatted on the stack so that it leaves
/// in one console write.
struct LineBuf {
    bytes: [u8; 256],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }
}

impl core::fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > self.bytes.len() {
            return Err(core::fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// What the oracle run under Xen did, for the report and the verdict.
#[derive(Debug, Clone, Copy)]
pub struct OracleFigures {
    /// Requests applied (and printed).
    pub requests: u64,
    /// Whether the run set up, ran every request and gave every frame back.
    pub clean: bool,
}

/// Runs the oracle's random requests under Xen PV (does nothing and
/// returns `None` on other platforms), seeded with `seed`, printing the
/// `ORACLE` lines the harness compares with the model's replay: one
/// `ORACLE-BLOCK` hash line per block of requests, or every request's line
/// with `pvmmu.oracle_lines` (`replay` names the option that draws the
/// same seed again).
pub fn run_oracle(kernel: &mut Kernel, seed: u64, replay: u64) -> Option<OracleFigures> {
    let every_line = kernel.options.oracle_lines;
    let (Some(pv), Some(dm)) = (kernel.pv.clone(), kernel.direct_map.as_ref()) else {
        return None;
    };
    let Some(root) = pv.pfn_to_mfn(dm.root.0).map(Mfn) else {
        crate::kprintln!("ORACLE-END setup EINVAL");
        return Some(OracleFigures {
            requests: 0,
            clean: false,
        });
    };
    let (mem, aliases) = (dm.mem, dm.aliases);
    let before = kernel.frames.free_count();
    let mut env = XenNegativeEnv::new(pv, mem, aliases, &mut kernel.frames, root);
    let requests = oracle::DEFAULT_REQUESTS;
    let start = crate::platform::rdtsc();
    let mut figures = OracleFigures {
        requests: 0,
        clean: false,
    };
    let mut print_cycles = 0u64;
    let mut blocks = oracle::Blocks::new();
    let mut end = None;
    oracle::run(
        &mut env,
        seed,
        requests,
        &mut |begin| crate::kprintln!("{begin}"),
        &mut |line| {
            use core::fmt::Write;
            let mut buf = LineBuf::new();
            let _ = if every_line {
                write!(buf, "{line}")
            } else {
                match blocks.push(line) {
                    Some(block) => write!(buf, "{block}"),
                    None => Ok(()),
                }
            };
            if buf.len > 0 {
                let t = crate::platform::rdtsc();
                crate::kprintln!("{}", buf.as_str());
                print_cycles += crate::platform::rdtsc().wrapping_sub(t);
            }
            figures.requests += 1;
        },
        &mut |e| end = Some(e),
    );
    if let Some(block) = blocks.finish() {
        crate::kprintln!("{block}");
    }
    if let Some(end) = end {
        crate::kprintln!("{end}");
        figures.clean = matches!(end, oracle::End::Done { leaked: 0, .. });
    }
    if let Some(w) = env.window.take() {
        env.free_frame(w);
    }
    let cycles = crate::platform::rdtsc().wrapping_sub(start);
    log::info!(
        "oracle: {} requests against Xen in {cycles} cycles, {print_cycles} of them printing \
         (seed {seed:#x}; every line with pvmmu.seed={replay:#x} pvmmu.oracle_lines)",
        figures.requests
    );
    let after = kernel.frames.free_count();
    if after != before {
        log::error!("oracle: {before} free frames before, {after} after");
        figures.clean = false;
    }
    Some(figures)
}
