//! The model's hypercall surface: `mmu_update`, `mmuext_op`,
//! `update_va_mapping` and `multicall` with Xen 4.17's semantics
//! (`do_mmu_update`, `do_mmuext_op`, `new_guest_cr3`,
//! `__do_update_va_mapping`, `do_multicall`).
//!
//! Invariant: a batch applies its requests strictly in order and stops at the
//! first refusal, which leaves the model exactly as it was before that
//! request; counters count what was submitted, as the real implementation's
//! do.

use hypercall::abi::{mmu_update, mmuext_op};
use hypercall::{BatchError, Call, HypercallStats, MmuExt, MmuHypercalls, PinLevel, XenError};

use super::rules::{entry_mfn, is_xen_l4_slot};
use super::tlb::{Scope, Vcpus};
use super::{DomainKind, Owner, PageType, XenModel, PAGE_PRESENT, PAGE_PSE};
use crate::types::{Mfn, ENTRIES};

/// `mmuext_op` commands the hypercall crate does not decode but Xen knows.
const MMUEXT_MARK_SUPER: u32 = 19;
const MMUEXT_UNMARK_SUPER: u32 = 20;

/// `HYPERVISOR_VIRT_END`: the end of Xen's hole in the canonical upper half.
const HYPERVISOR_VIRT_END: u64 = 0xffff_8800_0000_0000;

/// Whether a guest linear address is outside Xen's area (`__addr_ok`).
fn addr_ok(va: u64) -> bool {
    !((1 << 47)..HYPERVISOR_VIRT_END).contains(&va)
}

impl XenModel {
    /// One `mmu_update` request (`do_mmu_update`'s loop body).
    pub(crate) fn mmu_update_one(&mut self, req: &mmu_update) -> Result<(), XenError> {
        let cmd = (req.ptr & 7) as u32;
        match cmd {
            // MMU_NORMAL_PT_UPDATE, MMU_PT_UPDATE_PRESERVE_AD and
            // MMU_PT_UPDATE_NO_TRANSLATE (the same for a PV guest).
            0 | 2 | 3 => {
                let maddr = req.ptr & !7;
                let mfn = maddr >> 12;
                let index = ((maddr & 0xfff) >> 3) as usize;
                if self.owner(Mfn(mfn)) != Owner::Guest {
                    return Err(XenError::Inval);
                }
                let tw = self.tyword(mfn);
                if tw.count > 0 && tw.validated {
                    match tw.page_type() {
                        PageType::Writable => {
                            self.write_entry(mfn, index, req.val);
                            Ok(())
                        }
                        PageType::None => Err(XenError::Inval),
                        table => self.mod_entry(table.level(), mfn, index, req.val, cmd == 2),
                    }
                } else {
                    // Not a live table: a plain checked write to a frame
                    // that may be writable.
                    self.get_page_type(mfn, PageType::Writable)
                        .map_err(|_| XenError::Inval)?;
                    self.write_entry(mfn, index, req.val);
                    self.put_page_type(mfn);
                    Ok(())
                }
            }
            // MMU_MACHPHYS_UPDATE
            1 => {
                let mfn = req.ptr >> 12;
                if self.owner(Mfn(mfn)) != Owner::Guest {
                    return Err(XenError::Inval);
                }
                self.m2p_override.insert(mfn, req.val);
                Ok(())
            }
            _ => Err(XenError::NoSys),
        }
    }

    fn run_mmu_update(&mut self, reqs: &[mmu_update]) -> Result<(), BatchError> {
        self.stats.mmu_update_entries += reqs.len() as u64;
        let mut result = Ok(());
        for (done, req) in reqs.iter().enumerate() {
            if let Err(error) = self.mmu_update_one(req) {
                result = Err(BatchError { done, error });
                break;
            }
        }
        self.put_old_table();
        result
    }

    /// Validates (if needed) and pins `mfn` as a table of `level`
    /// (`MMUEXT_PIN_L*_TABLE`).
    pub(crate) fn pin(&mut self, level: PinLevel, mfn: u64) -> Result<(), XenError> {
        if self.owner(Mfn(mfn)) != Owner::Guest {
            return Err(XenError::Inval);
        }
        let ty = PageType::table(level.number()).unwrap_or(PageType::L1);
        self.get_page_type(mfn, ty)?;
        let mut tw = self.tyword(mfn);
        if tw.pinned {
            self.put_page_type(mfn);
            return Err(XenError::Inval);
        }
        tw.pinned = true;
        self.set_tyword(mfn, tw);
        Ok(())
    }

    /// `MMUEXT_UNPIN_TABLE`.
    pub(crate) fn unpin(&mut self, mfn: u64) -> Result<(), XenError> {
        if self.owner(Mfn(mfn)) != Owner::Guest {
            return Err(XenError::Inval);
        }
        let mut tw = self.tyword(mfn);
        if !tw.pinned {
            return Err(XenError::Inval);
        }
        tw.pinned = false;
        self.set_tyword(mfn, tw);
        self.put_page_type(mfn);
        Ok(())
    }

    /// `MMUEXT_NEW_BASEPTR` (`new_guest_cr3`).
    pub(crate) fn new_baseptr(&mut self, mfn: u64) -> Result<(), XenError> {
        if mfn == self.root {
            // Xen reloads CR3 (`write_ptbase`) all the same.
            self.vcpus.flush_local(Scope::All);
            return Ok(());
        }
        if self.owner(Mfn(mfn)) != Owner::Guest {
            return Err(XenError::Inval);
        }
        self.get_page_type(mfn, PageType::L4)?;
        // Without VMASST m2p_strict, Xen fills in the read-only M2P slot.
        if self.entry(mfn, 256) == 0 {
            let e = self.ro_mpt_entry();
            self.write_entry(mfn, 256, e);
        }
        let old = core::mem::replace(&mut self.root, mfn);
        if old != 0 {
            self.put_page_type(old);
        }
        self.tlb_flushes += 1;
        self.vcpus.flush_local(Scope::All);
        Ok(())
    }

    /// `MMUEXT_NEW_USER_BASEPTR` (0 drops the user root).
    pub(crate) fn new_user_baseptr(&mut self, mfn: u64) -> Result<(), XenError> {
        if mfn == self.user_root {
            return Ok(());
        }
        if mfn != 0 {
            if self.owner(Mfn(mfn)) != Owner::Guest {
                return Err(XenError::Inval);
            }
            self.get_page_type(mfn, PageType::L4)?;
        }
        let old = core::mem::replace(&mut self.user_root, mfn);
        if old != 0 {
            self.put_page_type(old);
        }
        Ok(())
    }

    fn mmuext_one(&mut self, op: &mmuext_op) -> Result<(), XenError> {
        let Some(ext) = MmuExt::decode(op) else {
            return match op.cmd {
                MMUEXT_MARK_SUPER | MMUEXT_UNMARK_SUPER => Err(XenError::OpNotSupp),
                _ => Err(XenError::NoSys),
            };
        };
        match ext {
            MmuExt::Pin { level, mfn } => self.pin(level, mfn),
            MmuExt::Unpin { mfn } => self.unpin(mfn),
            MmuExt::NewBaseptr { mfn } => self.new_baseptr(mfn),
            MmuExt::NewUserBaseptr { mfn } => self.new_user_baseptr(mfn),
            MmuExt::TlbFlushLocal => self.flushed(|v| v.flush_local(Scope::All)),
            MmuExt::InvlpgLocal { va } => self.flushed(|v| v.flush_local(Scope::Page(va))),
            MmuExt::TlbFlushAll => self.flushed(|v| v.flush_all(Scope::All)),
            MmuExt::InvlpgAll { va } => self.flushed(|v| v.flush_all(Scope::Page(va))),
            MmuExt::TlbFlushMulti { mask } => {
                self.vcpus.flush_multi(mask, Scope::All)?;
                self.tlb_flushes += 1;
                Ok(())
            }
            MmuExt::InvlpgMulti { va, mask } => {
                self.vcpus.flush_multi(mask, Scope::Page(va))?;
                self.tlb_flushes += 1;
                Ok(())
            }
            // `cache_flush_permitted`: I/O memory or port capabilities. The
            // two refusals differ in Xen 4.17 (`do_mmuext_op`): the local
            // flush says EACCES, the global one EINVAL.
            MmuExt::FlushCache => match self.kind {
                DomainKind::Hardware => {
                    self.cache_flushes.local += 1;
                    Ok(())
                }
                DomainKind::Unprivileged => Err(XenError::Acces),
            },
            MmuExt::FlushCacheGlobal => match self.kind {
                DomainKind::Hardware => {
                    self.cache_flushes.global += 1;
                    Ok(())
                }
                DomainKind::Unprivileged => Err(XenError::Inval),
            },
        }
    }

    fn flushed(&mut self, f: impl FnOnce(&mut Vcpus)) -> Result<(), XenError> {
        f(&mut self.vcpus);
        self.tlb_flushes += 1;
        Ok(())
    }

    fn run_mmuext(&mut self, ops: &[mmuext_op]) -> Result<(), BatchError> {
        self.stats.mmuext_ops += ops.len() as u64;
        let mut result = Ok(());
        for (done, op) in ops.iter().enumerate() {
            if let Err(error) = self.mmuext_one(op) {
                result = Err(BatchError { done, error });
                break;
            }
        }
        self.put_old_table();
        result
    }

    /// The L1 table and index that map `va` under the current kernel root
    /// (`map_guest_l1e` through Xen's linear mapping).
    pub(crate) fn l1_slot_of(&self, va: u64) -> Result<(u64, usize), XenError> {
        if !addr_ok(va) || self.root == 0 {
            return Err(XenError::Inval);
        }
        let idx = |shift: u32| ((va >> shift) & (ENTRIES as u64 - 1)) as usize;
        let l4e = self.entry(self.root, idx(39));
        if l4e & PAGE_PRESENT == 0 || self.owner(Mfn(entry_mfn(l4e))) != Owner::Guest {
            return Err(XenError::Inval);
        }
        let l3e = self.entry(entry_mfn(l4e), idx(30));
        if l3e & PAGE_PRESENT == 0 || self.owner(Mfn(entry_mfn(l3e))) != Owner::Guest {
            return Err(XenError::Inval);
        }
        let l2e = self.entry(entry_mfn(l3e), idx(21));
        if l2e & (PAGE_PRESENT | PAGE_PSE) != PAGE_PRESENT {
            return Err(XenError::Inval);
        }
        Ok((entry_mfn(l2e), idx(12)))
    }

    fn uvm(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
        let (l1, index) = self.l1_slot_of(va)?;
        if self.owner(Mfn(l1)) != Owner::Guest {
            return Err(XenError::Inval);
        }
        let tw = self.tyword(l1);
        if tw.count == 0 || !tw.validated || tw.page_type() != PageType::L1 {
            return Err(XenError::Inval);
        }
        self.mod_entry(1, l1, index, val, false)?;
        if flags & 3 != 0 {
            self.tlb_flushes += 1;
            // Anything but UVMF_LOCAL (0) or UVMF_ALL (4) above the flush
            // type is a pointer to a vCPU mask, which the model cannot read.
            if flags & !3 != 0 && flags & !3 != 4 {
                return Err(XenError::Fault);
            }
            let scope = if flags & 3 == 2 {
                Scope::Page(va)
            } else {
                Scope::All
            };
            if flags & 4 != 0 {
                self.vcpus.flush_all(scope);
            } else {
                self.vcpus.flush_local(scope);
            }
        }
        Ok(())
    }
}

impl MmuHypercalls for XenModel {
    fn mmu_update(&mut self, reqs: &[mmu_update]) -> Result<(), BatchError> {
        if reqs.is_empty() {
            return Ok(());
        }
        self.stats.hypercalls += 1;
        self.run_mmu_update(reqs)
    }

    fn mmuext_op(&mut self, ops: &[mmuext_op]) -> Result<(), BatchError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.stats.hypercalls += 1;
        self.run_mmuext(ops)
    }

    fn update_va_mapping(&mut self, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
        self.stats.hypercalls += 1;
        self.stats.update_va_mappings += 1;
        self.uvm(va, val, flags)
    }

    fn multicall(
        &mut self,
        calls: &[Call<'_>],
        results: &mut [Result<u64, XenError>],
    ) -> Result<(), XenError> {
        if !hypercall::mmu::multicall_needed(calls, results)? {
            return Ok(());
        }
        self.stats.hypercalls += 1;
        self.stats.multicalls += 1;
        for (call, slot) in calls.iter().zip(results.iter_mut()) {
            let rc = match *call {
                Call::MmuUpdate(reqs) => self.run_mmu_update(reqs).map_err(|e| e.error),
                Call::MmuExtOp(ops) => self.run_mmuext(ops).map_err(|e| e.error),
                Call::UpdateVaMapping { va, val, flags } => {
                    self.stats.update_va_mappings += 1;
                    self.uvm(va, val, flags)
                }
            };
            *slot = rc.map(|()| 0);
        }
        Ok(())
    }

    fn stats(&self) -> HypercallStats {
        self.stats
    }
}

/// Whether `index` of an L4 is one the guest may write.
pub fn is_guest_l4_slot(index: usize) -> bool {
    index < ENTRIES && !is_xen_l4_slot(index)
}
