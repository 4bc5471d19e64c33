//! A shared handle to a [`XenModel`], for code that needs the model as its
//! hypercall interface, its memory and its p2m at the same time (the PV
//! backend and the bootstrap borrow all three).

use alloc::rc::Rc;
use core::cell::RefCell;
use core::ptr::NonNull;

use hypercall::abi::{mmu_update, mmuext_op};
use hypercall::{BatchError, Call, HypercallStats, MmuHypercalls, XenError};

use super::XenModel;
use crate::phys::{FrameMap, FrameWords, PhysMem};
use crate::types::{Mfn, Pfn};

/// A shared handle to one model, implementing the three traits a PV backend
/// (or the bootstrap) borrows at once: hypercalls, memory and p2m.
///
/// Invariant: every clone is the same model; a call borrows it only for its
/// own duration, so no borrow is ever held across calls.
#[derive(Clone)]
pub struct SharedModel(pub Rc<RefCell<XenModel>>);

impl SharedModel {
    /// A handle owning `model`.
    pub fn new(model: XenModel) -> Self {
        Self(Rc::new(RefCell::new(model)))
    }
}

impl MmuHypercalls for SharedModel {
    fn mmu_update(&mut self, reqs: &[mmu_update]) -> Result<(), BatchError> {
        self.0.borrow_mut().mmu_update(reqs)
    }
    fn mmuext_op(&mut self, ops: &[mmuext_op]) -> Result<(), BatchError> {
        self.0.borrow_mut().mmuext_op(ops)
    }
    fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
        self.0.borrow_mut().update_va_mapping(va, val, flags)
    }
    fn multicall(
        &mut self,
        calls: &[Call<'_>],
        results: &mut [Result<u64, XenError>],
    ) -> Result<(), XenError> {
        self.0.borrow_mut().multicall(calls, results)
    }
    fn stats(&self) -> HypercallStats {
        self.0.borrow().stats()
    }
}

// SAFETY: forwards to the model, whose frame pointers are stable while it
// lives; the Rc keeps it alive as long as any handle.
unsafe impl PhysMem for SharedModel {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        self.0.borrow().frame_ptr(pfn)
    }
}

impl FrameMap for SharedModel {
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        self.0.borrow().to_mfn(pfn)
    }
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        self.0.borrow().to_pfn(mfn)
    }
}
