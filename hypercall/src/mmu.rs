//! The MMU hypercalls as a trait, so that pvmmu's PV backend runs unchanged
//! against real Xen ([`Xen`]) and against a software model of Xen on the
//! host.
//!
//! Invariant: an implementation applies the requests of one call strictly in
//! order and stops at the first failure, reporting how many were applied
//! ([`BatchError::done`]), as Xen does; `multicall` runs its calls in order
//! and a failing call does not stop the later ones (Xen's semantics).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{self, mmu_update, mmuext_op, multicall_entry, nr};
use crate::raw::{call5, hypercall_count};
use crate::XenError;

/// Kinds of `mmu_update` request, decoded from the low bits of `ptr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmuUpdate {
    /// Write `val` to the page-table entry at machine address `entry_maddr`
    /// (`MMU_NORMAL_PT_UPDATE`); Xen validates the new entry.
    PtUpdate {
        /// Machine address of the 8-byte entry.
        entry_maddr: u64,
        /// New entry value (machine frame number in bits 12..52).
        val: u64,
    },
    /// As [`MmuUpdate::PtUpdate`], but keep the accessed/dirty bits Xen or
    /// the hardware set (`MMU_PT_UPDATE_PRESERVE_AD`).
    PtUpdatePreserveAd {
        /// Machine address of the 8-byte entry.
        entry_maddr: u64,
        /// New entry value.
        val: u64,
    },
    /// Set the M2P entry of machine frame `mfn` to `pfn` (`MMU_MACHPHYS_UPDATE`).
    MachPhys {
        /// Machine frame.
        mfn: u64,
        /// Pseudo-physical frame it now backs.
        pfn: u64,
    },
}

impl MmuUpdate {
    /// The ABI form Xen reads.
    pub const fn encode(self) -> mmu_update {
        match self {
            Self::PtUpdate { entry_maddr, val } => mmu_update {
                ptr: (entry_maddr & !7) | abi::MMU_NORMAL_PT_UPDATE as u64,
                val,
            },
            Self::PtUpdatePreserveAd { entry_maddr, val } => mmu_update {
                ptr: (entry_maddr & !7) | abi::MMU_PT_UPDATE_PRESERVE_AD as u64,
                val,
            },
            Self::MachPhys { mfn, pfn } => mmu_update {
                ptr: (mfn << 12) | abi::MMU_MACHPHYS_UPDATE as u64,
                val: pfn,
            },
        }
    }

    /// Decodes the ABI form; `None` for a command Xen would refuse (`ENOSYS`).
    pub const fn decode(req: &mmu_update) -> Option<Self> {
        let addr = req.ptr & !7;
        match (req.ptr & 7) as u32 {
            abi::MMU_NORMAL_PT_UPDATE => Some(Self::PtUpdate {
                entry_maddr: addr,
                val: req.val,
            }),
            abi::MMU_PT_UPDATE_PRESERVE_AD => Some(Self::PtUpdatePreserveAd {
                entry_maddr: addr,
                val: req.val,
            }),
            abi::MMU_MACHPHYS_UPDATE => Some(Self::MachPhys {
                mfn: req.ptr >> 12,
                pfn: req.val,
            }),
            _ => None,
        }
    }
}

/// Page-table level of a pin request (Xen's L1..L4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PinLevel {
    /// L1: page table (4 KiB entries).
    L1,
    /// L2: page directory.
    L2,
    /// L3: page-directory-pointer table.
    L3,
    /// L4: the root.
    L4,
}

impl PinLevel {
    /// 1..=4.
    pub const fn number(self) -> u8 {
        match self {
            Self::L1 => 1,
            Self::L2 => 2,
            Self::L3 => 3,
            Self::L4 => 4,
        }
    }
}

/// A decoded `mmuext_op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmuExt {
    /// Validate the frame as a table of `level` and pin that type.
    Pin {
        /// Table level.
        level: PinLevel,
        /// Machine frame of the table.
        mfn: u64,
    },
    /// Drop the pin of a pinned table.
    Unpin {
        /// Machine frame of the table.
        mfn: u64,
    },
    /// Switch the kernel root to this L4 (`MMUEXT_NEW_BASEPTR`).
    NewBaseptr {
        /// Machine frame of the new L4.
        mfn: u64,
    },
    /// Switch the user-mode root (`MMUEXT_NEW_USER_BASEPTR`); 0 for none.
    NewUserBaseptr {
        /// Machine frame of the user L4, or 0.
        mfn: u64,
    },
    /// Flush this vCPU's TLB.
    TlbFlushLocal,
    /// Invalidate one address on this vCPU.
    InvlpgLocal {
        /// Linear address.
        va: u64,
    },
    /// Flush every vCPU's TLB.
    TlbFlushAll,
    /// Invalidate one address on every vCPU.
    InvlpgAll {
        /// Linear address.
        va: u64,
    },
    /// Flush the TLBs of the vCPUs in a mask (`MMUEXT_TLB_FLUSH_MULTI`).
    TlbFlushMulti {
        /// The guest address of the mask (one `unsigned long`, bit n for
        /// vCPU n), which Xen reads when it runs this operation: after
        /// every request and operation before it in the same batch.
        mask: *const u64,
    },
    /// Invalidate one address on the vCPUs in a mask
    /// (`MMUEXT_INVLPG_MULTI`).
    InvlpgMulti {
        /// Linear address.
        va: u64,
        /// The guest address of the mask, as for [`MmuExt::TlbFlushMulti`].
        mask: *const u64,
    },
    /// Write back and invalidate the caches of the physical CPU this vCPU
    /// runs on (`MMUEXT_FLUSH_CACHE`, `wbinvd`): only for a domain whose
    /// cache flushes Xen permits (I/O memory or port capabilities), else
    /// `EACCES`.
    FlushCache,
    /// Write back and invalidate every physical CPU's caches
    /// (`MMUEXT_FLUSH_CACHE_GLOBAL`): as [`MmuExt::FlushCache`], but
    /// refused with `EINVAL` (not `EACCES`) without the permission.
    FlushCacheGlobal,
}

impl MmuExt {
    /// The ABI form Xen reads.
    pub fn encode(self) -> mmuext_op {
        // SAFETY (none needed): building a union by value is safe; only
        // reading one is not.
        let mut mask: *const u64 = core::ptr::null();
        let (cmd, arg1) = match self {
            Self::Pin { level, mfn } => (
                match level {
                    PinLevel::L1 => abi::MMUEXT_PIN_L1_TABLE,
                    PinLevel::L2 => abi::MMUEXT_PIN_L2_TABLE,
                    PinLevel::L3 => abi::MMUEXT_PIN_L3_TABLE,
                    PinLevel::L4 => abi::MMUEXT_PIN_L4_TABLE,
                },
                mfn,
            ),
            Self::Unpin { mfn } => (abi::MMUEXT_UNPIN_TABLE, mfn),
            Self::NewBaseptr { mfn } => (abi::MMUEXT_NEW_BASEPTR, mfn),
            Self::NewUserBaseptr { mfn } => (abi::MMUEXT_NEW_USER_BASEPTR, mfn),
            Self::TlbFlushLocal => (abi::MMUEXT_TLB_FLUSH_LOCAL, 0),
            Self::InvlpgLocal { va } => (abi::MMUEXT_INVLPG_LOCAL, va),
            Self::TlbFlushAll => (abi::MMUEXT_TLB_FLUSH_ALL, 0),
            Self::InvlpgAll { va } => (abi::MMUEXT_INVLPG_ALL, va),
            Self::TlbFlushMulti { mask: m } => {
                mask = m;
                (abi::MMUEXT_TLB_FLUSH_MULTI, 0)
            }
            Self::FlushCache => (abi::MMUEXT_FLUSH_CACHE, 0),
            Self::FlushCacheGlobal => (abi::MMUEXT_FLUSH_CACHE_GLOBAL, 0),
            Self::InvlpgMulti { va, mask: m } => {
                mask = m;
                (abi::MMUEXT_INVLPG_MULTI, va)
            }
        };
        let arg2 = if mask.is_null() {
            xen_sys::mmuext_op__bindgen_ty_2 { src_mfn: 0 }
        } else {
            xen_sys::mmuext_op__bindgen_ty_2 {
                vcpumask: mask.cast(),
            }
        };
        mmuext_op {
            cmd,
            arg1: xen_sys::mmuext_op__bindgen_ty_1 { mfn: arg1 },
            arg2,
        }
    }

    /// Decodes the ABI form; `None` for a command this crate does not issue.
    pub fn decode(op: &mmuext_op) -> Option<Self> {
        // SAFETY: both members of `arg1` are plain u64-sized integers, so
        // reading either is valid for any bit pattern.
        let arg1 = unsafe { op.arg1.mfn };
        Some(match op.cmd {
            abi::MMUEXT_PIN_L1_TABLE => Self::Pin {
                level: PinLevel::L1,
                mfn: arg1,
            },
            abi::MMUEXT_PIN_L2_TABLE => Self::Pin {
                level: PinLevel::L2,
                mfn: arg1,
            },
            abi::MMUEXT_PIN_L3_TABLE => Self::Pin {
                level: PinLevel::L3,
                mfn: arg1,
            },
            abi::MMUEXT_PIN_L4_TABLE => Self::Pin {
                level: PinLevel::L4,
                mfn: arg1,
            },
            abi::MMUEXT_UNPIN_TABLE => Self::Unpin { mfn: arg1 },
            abi::MMUEXT_NEW_BASEPTR => Self::NewBaseptr { mfn: arg1 },
            abi::MMUEXT_NEW_USER_BASEPTR => Self::NewUserBaseptr { mfn: arg1 },
            abi::MMUEXT_TLB_FLUSH_LOCAL => Self::TlbFlushLocal,
            abi::MMUEXT_INVLPG_LOCAL => Self::InvlpgLocal { va: arg1 },
            abi::MMUEXT_TLB_FLUSH_ALL => Self::TlbFlushAll,
            abi::MMUEXT_INVLPG_ALL => Self::InvlpgAll { va: arg1 },
            abi::MMUEXT_FLUSH_CACHE => Self::FlushCache,
            abi::MMUEXT_FLUSH_CACHE_GLOBAL => Self::FlushCacheGlobal,
            // SAFETY: `arg2` is a plain pointer-sized union; reading it as
            // a pointer is valid for any bit pattern (it is not
            // dereferenced here).
            abi::MMUEXT_TLB_FLUSH_MULTI => Self::TlbFlushMulti {
                mask: unsafe { op.arg2.vcpumask }.cast(),
            },
            // SAFETY: as above.
            abi::MMUEXT_INVLPG_MULTI => Self::InvlpgMulti {
                va: arg1,
                mask: unsafe { op.arg2.vcpumask }.cast(),
            },
            _ => return None,
        })
    }
}

/// A batch call that failed part-way: the first `done` requests were applied,
/// request number `done` failed with `error`, the rest were not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchError {
    /// Requests applied before the failure.
    pub done: usize,
    /// Why request `done` was refused.
    pub error: XenError,
}

/// One call inside a `multicall`.
#[derive(Clone, Copy)]
pub enum Call<'a> {
    /// `mmu_update(reqs, DOMID_SELF)`.
    MmuUpdate(&'a [mmu_update]),
    /// `mmuext_op(ops, DOMID_SELF)`.
    MmuExtOp(&'a [mmuext_op]),
    /// `update_va_mapping(va, val, flags)`.
    UpdateVaMapping {
        /// Linear address whose L1 entry changes.
        va: u64,
        /// New L1 entry.
        val: u64,
        /// `UVMF_*` flush flags.
        flags: u64,
    },
}

/// Most calls one `multicall` may carry in this crate.
pub const MAX_MULTICALL: usize = 32;

/// The checks every [`MmuHypercalls::multicall`] implementation makes
/// before it issues anything: `Err(TooBig)` for more than [`MAX_MULTICALL`]
/// calls or fewer result slots than calls, `Ok(false)` for an empty list
/// (nothing to do, no hypercall), `Ok(true)` otherwise.
pub fn multicall_needed(
    calls: &[Call<'_>],
    results: &[Result<u64, XenError>],
) -> Result<bool, XenError> {
    if calls.len() > MAX_MULTICALL || results.len() < calls.len() {
        return Err(XenError::TooBig);
    }
    Ok(!calls.is_empty())
}

/// Counters every implementation keeps, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HypercallStats {
    /// Hypercalls issued (a multicall counts once).
    pub hypercalls: u64,
    /// `mmu_update` requests submitted (inside multicalls too).
    pub mmu_update_entries: u64,
    /// `mmuext_op` operations submitted (inside multicalls too).
    pub mmuext_ops: u64,
    /// `update_va_mapping` calls (inside multicalls too).
    pub update_va_mappings: u64,
    /// `multicall` hypercalls.
    pub multicalls: u64,
}

/// The MMU hypercalls a PV page-table backend needs, on the calling domain.
pub trait MmuHypercalls {
    /// `mmu_update(reqs, count, &done, DOMID_SELF)`.
    fn mmu_update(&mut self, reqs: &[mmu_update]) -> Result<(), BatchError>;
    /// `mmuext_op(ops, count, &done, DOMID_SELF)`.
    fn mmuext_op(&mut self, ops: &[mmuext_op]) -> Result<(), BatchError>;
    /// `update_va_mapping(va, val, flags)`: write the L1 entry mapping `va`.
    fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError>;
    /// `multicall(calls)`: runs the calls in order; `results[i]` receives
    /// call `i`'s return value (`Ok(ret)` or the error), the hypercall itself
    /// fails only if the list is unusable (e.g. more than [`MAX_MULTICALL`]).
    fn multicall(
        &mut self,
        calls: &[Call<'_>],
        results: &mut [Result<u64, XenError>],
    ) -> Result<(), XenError>;
    /// Counters since this implementation was created (or since boot for
    /// [`Xen`]).
    fn stats(&self) -> HypercallStats;
}

/// A borrowed implementation is one too (the bootstrap takes
/// `&mut dyn MmuHypercalls`).
impl<T: MmuHypercalls + ?Sized> MmuHypercalls for &mut T {
    fn mmu_update(&mut self, reqs: &[mmu_update]) -> Result<(), BatchError> {
        (**self).mmu_update(reqs)
    }
    fn mmuext_op(&mut self, ops: &[mmuext_op]) -> Result<(), BatchError> {
        (**self).mmuext_op(ops)
    }
    fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
        (**self).update_va_mapping(va, val, flags)
    }
    fn multicall(
        &mut self,
        calls: &[Call<'_>],
        results: &mut [Result<u64, XenError>],
    ) -> Result<(), XenError> {
        (**self).multicall(calls, results)
    }
    fn stats(&self) -> HypercallStats {
        (**self).stats()
    }
}

static MMU_ENTRIES: AtomicU64 = AtomicU64::new(0);
static MMUEXT_OPS: AtomicU64 = AtomicU64::new(0);
static UVMS: AtomicU64 = AtomicU64::new(0);
static MULTICALLS: AtomicU64 = AtomicU64::new(0);

/// What every real hypercall wrapper of this crate has issued since boot
/// (all zero where none was issued, e.g. natively). Reads counters only.
pub fn issued_stats() -> HypercallStats {
    HypercallStats {
        hypercalls: hypercall_count(),
        mmu_update_entries: MMU_ENTRIES.load(Ordering::Relaxed),
        mmuext_ops: MMUEXT_OPS.load(Ordering::Relaxed),
        update_va_mappings: UVMS.load(Ordering::Relaxed),
        multicalls: MULTICALLS.load(Ordering::Relaxed),
    }
}

/// The real hypervisor, reached by `syscall` from a 64-bit PV guest kernel.
///
/// Constructing one is `unsafe`: its methods issue hypercalls, which only a
/// Xen PV guest kernel may do.
#[derive(Debug)]
pub struct Xen {
    _private: (),
}

impl Xen {
    /// # Safety
    /// The caller must be running as a 64-bit Xen PV guest kernel.
    pub const unsafe fn new() -> Self {
        Self { _private: () }
    }
}

fn batch_result(ret: i64, done: u32) -> Result<(), BatchError> {
    XenError::check(ret)
        .map(|_| ())
        .map_err(|error| BatchError {
            done: done as usize,
            error,
        })
}

impl MmuHypercalls for Xen {
    fn mmu_update(&mut self, reqs: &[mmu_update]) -> Result<(), BatchError> {
        if reqs.is_empty() {
            return Ok(());
        }
        MMU_ENTRIES.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        let mut done: u32 = 0;
        // SAFETY: `Xen::new`'s contract says we are a PV guest; `reqs` and
        // `done` are valid for the call's duration.
        let ret = unsafe {
            call5(
                nr::MMU_UPDATE,
                reqs.as_ptr() as u64,
                reqs.len() as u64,
                &mut done as *mut u32 as u64,
                u64::from(abi::DOMID_SELF),
                0,
            )
        };
        batch_result(ret, done)
    }

    fn mmuext_op(&mut self, ops: &[mmuext_op]) -> Result<(), BatchError> {
        if ops.is_empty() {
            return Ok(());
        }
        MMUEXT_OPS.fetch_add(ops.len() as u64, Ordering::Relaxed);
        let mut done: u32 = 0;
        // SAFETY: as in `mmu_update`.
        let ret = unsafe {
            call5(
                nr::MMUEXT_OP,
                ops.as_ptr() as u64,
                ops.len() as u64,
                &mut done as *mut u32 as u64,
                u64::from(abi::DOMID_SELF),
                0,
            )
        };
        batch_result(ret, done)
    }

    fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
        UVMS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: no pointer arguments; PV guest per `Xen::new`.
        let ret = unsafe { call5(nr::UPDATE_VA_MAPPING, va, val, flags, 0, 0) };
        XenError::check(ret).map(|_| ())
    }

    fn multicall(
        &mut self,
        calls: &[Call<'_>],
        results: &mut [Result<u64, XenError>],
    ) -> Result<(), XenError> {
        if !multicall_needed(calls, results)? {
            return Ok(());
        }
        let mut entries = [multicall_entry {
            op: 0,
            result: 0,
            args: [0; 6],
        }; MAX_MULTICALL];
        for (entry, call) in entries.iter_mut().zip(calls) {
            *entry = match *call {
                Call::MmuUpdate(reqs) => {
                    MMU_ENTRIES.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                    multicall_entry {
                        op: u64::from(nr::MMU_UPDATE),
                        result: 0,
                        args: [
                            reqs.as_ptr() as u64,
                            reqs.len() as u64,
                            0,
                            u64::from(abi::DOMID_SELF),
                            0,
                            0,
                        ],
                    }
                }
                Call::MmuExtOp(ops) => {
                    MMUEXT_OPS.fetch_add(ops.len() as u64, Ordering::Relaxed);
                    multicall_entry {
                        op: u64::from(nr::MMUEXT_OP),
                        result: 0,
                        args: [
                            ops.as_ptr() as u64,
                            ops.len() as u64,
                            0,
                            u64::from(abi::DOMID_SELF),
                            0,
                            0,
                        ],
                    }
                }
                Call::UpdateVaMapping { va, val, flags } => {
                    UVMS.fetch_add(1, Ordering::Relaxed);
                    multicall_entry {
                        op: u64::from(nr::UPDATE_VA_MAPPING),
                        result: 0,
                        args: [va, val, flags, 0, 0, 0],
                    }
                }
            };
        }
        MULTICALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `entries` and every request slice they point to outlive the
        // call; PV guest per `Xen::new`.
        let ret = unsafe {
            call5(
                nr::MULTICALL,
                entries.as_mut_ptr() as u64,
                calls.len() as u64,
                0,
                0,
                0,
            )
        };
        XenError::check(ret)?;
        for (slot, entry) in results.iter_mut().zip(&entries[..calls.len()]) {
            *slot = XenError::check(entry.result as i64).map(|v| v as u64);
        }
        Ok(())
    }

    fn stats(&self) -> HypercallStats {
        issued_stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmu_update_round_trips() {
        let cases = [
            MmuUpdate::PtUpdate {
                entry_maddr: 0x1234_5ff8,
                val: 0x8000_0000_0abc_d067,
            },
            MmuUpdate::PtUpdatePreserveAd {
                entry_maddr: 0x1000,
                val: 0,
            },
            MmuUpdate::MachPhys {
                mfn: 0x4321,
                pfn: 0x77,
            },
        ];
        for c in cases {
            assert_eq!(MmuUpdate::decode(&c.encode()), Some(c));
        }
        assert_eq!(
            MmuUpdate::decode(&mmu_update {
                ptr: 0x1007,
                val: 0
            }),
            None
        );
        assert_eq!(
            MmuUpdate::PtUpdate {
                entry_maddr: 0x2008,
                val: 1
            }
            .encode()
            .ptr,
            0x2008
        );
    }

    #[test]
    fn mmuext_round_trips() {
        let cases = [
            MmuExt::Pin {
                level: PinLevel::L4,
                mfn: 9,
            },
            MmuExt::Pin {
                level: PinLevel::L1,
                mfn: 10,
            },
            MmuExt::Unpin { mfn: 11 },
            MmuExt::NewBaseptr { mfn: 12 },
            MmuExt::NewUserBaseptr { mfn: 0 },
            MmuExt::TlbFlushLocal,
            MmuExt::InvlpgLocal {
                va: 0xffff_8880_0000_1000,
            },
            MmuExt::TlbFlushAll,
            MmuExt::InvlpgAll { va: 0x1000 },
            MmuExt::FlushCache,
            MmuExt::FlushCacheGlobal,
        ];
        assert_eq!(MmuExt::FlushCache.encode().cmd, 12, "Xen's number");
        assert_eq!(MmuExt::FlushCacheGlobal.encode().cmd, 18, "Xen's number");
        for c in cases {
            assert_eq!(MmuExt::decode(&c.encode()), Some(c));
        }
        let mask = 0b101u64;
        let multi = [
            MmuExt::TlbFlushMulti { mask: &mask },
            MmuExt::InvlpgMulti {
                va: 0x2000,
                mask: &mask,
            },
        ];
        for (c, cmd) in multi
            .into_iter()
            .zip([abi::MMUEXT_TLB_FLUSH_MULTI, abi::MMUEXT_INVLPG_MULTI])
        {
            let op = c.encode();
            assert_eq!(op.cmd, cmd);
            // SAFETY: `encode` stored the mask pointer in `vcpumask`.
            assert_eq!(
                unsafe { op.arg2.vcpumask }.cast::<u64>(),
                &mask as *const u64
            );
            assert_eq!(MmuExt::decode(&op), Some(c));
        }
        assert_eq!(
            MmuExt::Pin {
                level: PinLevel::L3,
                mfn: 1
            }
            .encode()
            .cmd,
            abi::MMUEXT_PIN_L3_TABLE
        );
    }
}
