//! The two backends of the live tree, and what the tests need from them
//! beyond [`Backend`] (hypercall counters, Xen's word on the root's pin, a
//! TLB flush the `x86_64` crate asked for).

use hypercall::{HypercallStats, MmuExt, MmuHypercalls, PinLevel, XenError};
use pvmmu::backend::{Backend, CpuTlb, Native, TlbScope, XenPv};
use pvmmu::Pfn;
use x86_64::structures::paging::mapper::MapperFlush;
use x86_64::structures::paging::PageSize;

use crate::directmap::{DirectMem, KernelAliases};
use crate::selftest::{Failure, TestResult};
use crate::xen_pv::PvBoot;

use super::PAGE;

/// The PV backend over the live tree.
pub(crate) type PvBackend = XenPv<hypercall::Xen, DirectMem, PvBoot, KernelAliases>;
/// The native backend over the live tree.
pub(crate) type NativeBackend = Native<DirectMem, CpuTlb>;

/// What the tests need beyond [`Backend`] from the backend of the live
/// tree.
pub(crate) trait LiveBackend: Backend {
    /// Hypercall counters since boot (natively: no hypercall, all zero).
    fn counters(&self) -> HypercallStats;
    /// Whether Xen holds the root pinned (`None` natively: no pins).
    fn root_pinned(&mut self, root: Pfn) -> Result<Option<bool>, Failure>;
    /// Carries out a TLB flush the `x86_64` crate asked for (of the page
    /// at `va`).
    fn flush_x86<S: PageSize>(&mut self, flush: MapperFlush<S>, va: u64) -> TestResult;
}

impl LiveBackend for PvBackend {
    fn counters(&self) -> HypercallStats {
        self.hypercalls().stats()
    }

    /// Pins the root again: Xen answers EINVAL when it is pinned already
    /// (and drops the extra reference); if the pin succeeds the root was
    /// not pinned, and it is unpinned again.
    fn root_pinned(&mut self, root: Pfn) -> Result<Option<bool>, Failure> {
        let mfn = self
            .to_mfn(root)
            .ok_or(Failure::Check("root has no machine frame"))?
            .0;
        let pin = MmuExt::Pin {
            level: PinLevel::L4,
            mfn,
        };
        match self.hypercalls_mut().mmuext_op(&[pin.encode()]) {
            Err(e) if e.error == XenError::Inval => Ok(Some(true)),
            Ok(()) => {
                let unpin = MmuExt::Unpin { mfn };
                let _ = self.hypercalls_mut().mmuext_op(&[unpin.encode()]);
                Ok(Some(false))
            }
            Err(e) => Err(Failure::Xen {
                what: "pin of the live root",
                error: e.error,
            }),
        }
    }

    /// `invlpg` is privileged: the flush goes through Xen.
    fn flush_x86<S: PageSize>(&mut self, flush: MapperFlush<S>, va: u64) -> TestResult {
        flush.ignore();
        self.flush_tlb(TlbScope::Range {
            start: va,
            pages: S::SIZE / PAGE,
        })
        .map_err(|_| Failure::Check("TLB flush through Xen failed"))
    }
}

impl LiveBackend for NativeBackend {
    fn counters(&self) -> HypercallStats {
        HypercallStats {
            hypercalls: hypercall::raw::hypercall_count(),
            ..HypercallStats::default()
        }
    }
    fn root_pinned(&mut self, _root: Pfn) -> Result<Option<bool>, Failure> {
        Ok(None)
    }
    fn flush_x86<S: PageSize>(&mut self, flush: MapperFlush<S>, _va: u64) -> TestResult {
        flush.flush();
        Ok(())
    }
}
