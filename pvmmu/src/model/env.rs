//! The negative suite's environment on the host: a [`XenModel`] that has
//! been through [`XenModel::start_of_day`], with frames handed out after the
//! boot tables.
//!
//! Invariant: frames handed out are never part of the boot mapping, so the
//! model has no alias of them to make read-only (`set_alias_writable`
//! changes nothing, as the contract allows; it only refuses a writable
//! alias of a frame Xen holds as a table, as Xen would).

use hypercall::{MmuHypercalls, XenError};

use super::{DomainKind, XenModel};
use crate::negative::NegativeEnv;
use crate::oracle::OracleEnv;
use crate::phys::{FrameMap, PhysMem};
use crate::types::{Mfn, Pfn};

/// Virtual base of the boot mapping the environment builds (where a PV
/// kernel is commonly linked).
pub const MODEL_VIRT_BASE: u64 = 0xffff_ffff_8000_0000;

/// A [`NegativeEnv`] over a freshly booted [`XenModel`].
#[derive(Debug)]
pub struct ModelNegativeEnv {
    model: XenModel,
    next_free: u64,
    freed: alloc::vec::Vec<Pfn>,
}

impl ModelNegativeEnv {
    /// A model domain of `kind` with `nr_pages` frames, booted with 16 image
    /// frames mapped at [`MODEL_VIRT_BASE`].
    ///
    /// Errors: those of [`XenModel::start_of_day`] (`ENOMEM` when
    /// `nr_pages` is too small for the boot tables).
    pub fn new(kind: DomainKind, nr_pages: u64) -> Result<Self, XenError> {
        let mut model = XenModel::with_kind(nr_pages, kind);
        let boot = model.start_of_day(MODEL_VIRT_BASE, 16)?;
        model.reset_stats();
        Ok(Self {
            model,
            next_free: boot.first_free_pfn.0,
            freed: alloc::vec::Vec::new(),
        })
    }

    /// The model, for inspection.
    pub fn model(&self) -> &XenModel {
        &self.model
    }

    /// The model, mutably.
    pub fn model_mut(&mut self) -> &mut XenModel {
        &mut self.model
    }
}

impl NegativeEnv for ModelNegativeEnv {
    fn hypercalls(&mut self) -> &mut dyn MmuHypercalls {
        &mut self.model
    }

    fn phys_mem(&self) -> &dyn PhysMem {
        &self.model
    }

    fn frame_map(&self) -> &dyn FrameMap {
        &self.model
    }

    fn allocate_frame(&mut self) -> Option<Pfn> {
        if let Some(p) = self.freed.pop() {
            return Some(p);
        }
        if self.next_free >= self.model.nr_pages() {
            return None;
        }
        self.next_free += 1;
        Some(Pfn(self.next_free - 1))
    }

    fn free_frame(&mut self, pfn: Pfn) {
        self.freed.push(pfn);
    }

    /// There is no alias to change, but a writable one would be refused
    /// where Xen refuses it: for a frame that holds a table type.
    fn set_alias_writable(&mut self, pfn: Pfn, writable: bool) -> Result<(), XenError> {
        let mfn = self.model.mfn_of(pfn).ok_or(XenError::Inval)?;
        let ty = self.model.page_type(mfn);
        if writable && ty != super::PageType::None && ty != super::PageType::Writable {
            return Err(XenError::Busy);
        }
        Ok(())
    }

    fn current_root(&self) -> Mfn {
        self.model.current_root().unwrap_or(Mfn(0))
    }
}

/// The oracle's window: an empty entry of the boot mapping's L1, past the
/// mapped image and tables.
pub const MODEL_WINDOW_VA: u64 = MODEL_VIRT_BASE + 0x100 * 0x1000;

impl OracleEnv for ModelNegativeEnv {
    fn window_va(&mut self) -> Option<u64> {
        self.model.l1_slot_of(MODEL_WINDOW_VA).ok()?;
        Some(MODEL_WINDOW_VA)
    }
}
