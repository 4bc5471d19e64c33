//! Errors of address-space operations.
//!
//! Invariant: every variant says what went wrong with the caller's request
//! (or which refusal Xen gave); a call that returns one of them has left the
//! tree as it was (see the module docs of [`crate::space`] for the one
//! documented exception).

use hypercall::XenError;

use crate::backend::BackendError;
use crate::entry::FlagError;
use crate::types::{Mfn, Pfn};
use crate::walk::WalkError;

/// Why an address-space operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A page of the range is already mapped (or lies inside a large page).
    AlreadyMapped {
        /// First mapped address found.
        va: u64,
    },
    /// A page of the range is not mapped.
    NotMapped {
        /// First unmapped address found.
        va: u64,
    },
    /// Address, frame or length not aligned to the page size.
    Misaligned,
    /// An address of the range is not canonical, or the range crosses the
    /// non-canonical hole.
    NonCanonical {
        /// The offending address.
        va: u64,
    },
    /// The range touches Xen's part of the address space (PV).
    XenHole,
    /// Address or frame arithmetic overflows (range wraps, frame too large).
    RangeOverflow,
    /// The frame allocator ran out of frames for page tables.
    OutOfFrames,
    /// A frame is not guest memory (no machine frame behind it).
    BadFrame(Pfn),
    /// A present entry points to a machine frame the guest does not own.
    ForeignFrame(Mfn),
    /// The flags break the backend's entry rules.
    Flags(FlagError),
    /// Large pages of the requested size are not available here (never
    /// under PV; natively as CPUID and the backend allow).
    LargePagesUnavailable,
    /// The range covers only part of a large page (splitting is CPA's job).
    SplitsLargePage {
        /// Start of the large page.
        va: u64,
    },
    /// Writable and executable requested without explicit consent.
    WriteExecute,
    /// Xen refused a request that maps a frame writable: a page-table frame
    /// mapped writable (directly, or inside a table whose validation
    /// failed when it was hooked).
    WritablePageTable {
        /// Machine frame of the refused entry.
        mfn: Mfn,
        /// Xen's error.
        error: XenError,
    },
    /// Xen refused a request with this error.
    Hypervisor(XenError),
    /// Under PV a change would make a page-table frame writable: refused
    /// by pvmmu before Xen is asked (CPA).
    PageTableFrame {
        /// The address mapping the frame.
        va: u64,
        /// The page-table frame.
        pfn: Pfn,
    },
    /// CPA was asked to set or clear flags outside
    /// [`crate::space::CPA_FLAGS`], or to set and clear the same flag.
    CpaFlags,
    /// A kernel alias could not be resolved: the backend knows no current
    /// root.
    NoCurrentRoot,
    /// CPA refused a change that breaks a static protection (see
    /// [`crate::space::StaticProtection`]): a kernel text or read-only data
    /// frame made writable, an executable mapping of kernel text made
    /// non-executable, or any change to a page shared with the hypervisor.
    StaticProtection {
        /// The address mapping the protected frame.
        va: u64,
        /// The protected frame.
        pfn: Pfn,
        /// What the frame holds.
        region: crate::space::Protected,
    },
    /// [`crate::space::MAX_PROTECTIONS`] static protections are registered
    /// already.
    TooManyProtections,
    /// A static protection registered after a lockless CPA handle was made
    /// (the handle holds a copy of them).
    ProtectionsFrozen,
    /// The lockless CPA path leaves this change to the locked one.
    SlowPath(crate::space::SlowPath),
    /// `unmap` of a range touching a stable range (see
    /// [`crate::space::AddressSpace::cpa_stable`]): no table there may be
    /// freed.
    StableRange {
        /// First address of the range inside the stable range.
        va: u64,
    },
    /// [`crate::space::MAX_STABLE`] stable ranges are registered already.
    TooManyStableRanges,
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::BadFrame(pfn) => Error::BadFrame(pfn),
            BackendError::Flags(f) => Error::Flags(f),
            BackendError::Refused { error, val, .. }
                if crate::backend::xen::refused_writable(val) =>
            {
                Error::WritablePageTable {
                    mfn: crate::entry::Entry(val).mfn(),
                    error,
                }
            }
            BackendError::Refused { error, .. } | BackendError::Hypervisor(error) => {
                Error::Hypervisor(error)
            }
            BackendError::NoCurrentRoot => Error::NoCurrentRoot,
        }
    }
}

impl Error {
    /// The walker's error for a walk towards `va`.
    pub(crate) fn from_walk(e: WalkError, va: u64) -> Self {
        match e {
            WalkError::NotPresent { .. } => Error::NotMapped { va },
            WalkError::ForeignFrame(mfn) => Error::ForeignFrame(mfn),
        }
    }
}
