//! Per-vCPU TLBs: what each simulated vCPU may still translate after the
//! tables changed, until a flush that covers it.
//!
//! A vCPU caches a translation when it reads through it
//! ([`XenModel::vcpu_translate`]) and keeps it, whatever the tables say
//! later, until an operation flushes it: `MMUEXT_INVLPG_LOCAL` /
//! `TLB_FLUSH_LOCAL` (and `update_va_mapping`'s local flags) only on the
//! vCPU that issues it ([`XenModel::set_current_vcpu`]), `*_MULTI` on the
//! vCPUs of its mask, `*_ALL` on every vCPU, `MMUEXT_NEW_BASEPTR` on the
//! issuing vCPU. A missing or too-narrow flush leaves a stale entry that
//! [`XenModel::vcpu_cached`] shows.
//!
//! Invariant: every vCPU walks the one kernel root the model has (an
//! address space live on several vCPUs); only present leaves are cached,
//! as hardware caches them.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use hypercall::XenError;

use super::{XenModel, PAGE_PRESENT};
use crate::cpus::ActiveCpus;

/// Most vCPUs the model simulates (one mask word).
pub const MODEL_MAX_VCPUS: usize = 64;

/// The model's vCPUs: one translation cache each, and which one is issuing
/// hypercalls.
#[derive(Debug)]
pub(crate) struct Vcpus {
    /// Cached L1 entries by page address, one map per vCPU.
    tlbs: Vec<BTreeMap<u64, u64>>,
    current: usize,
    /// Mask addresses the guest may pass to `*_MULTI` (the model reads
    /// only those).
    masks: Vec<&'static ActiveCpus>,
}

impl Default for Vcpus {
    fn default() -> Self {
        Self {
            tlbs: alloc::vec![BTreeMap::new()],
            current: 0,
            masks: Vec::new(),
        }
    }
}

/// Which translations a flush drops.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope {
    /// The page at this address.
    Page(u64),
    /// Everything.
    All,
}

fn page(va: u64) -> u64 {
    va & !0xfff
}

impl Vcpus {
    fn flush_one(&mut self, vcpu: usize, scope: Scope) {
        if let Some(tlb) = self.tlbs.get_mut(vcpu) {
            match scope {
                Scope::Page(va) => {
                    tlb.remove(&page(va));
                }
                Scope::All => tlb.clear(),
            }
        }
    }

    /// Flushes `scope` on the issuing vCPU.
    pub(crate) fn flush_local(&mut self, scope: Scope) {
        self.flush_one(self.current, scope);
    }

    /// Flushes `scope` on every vCPU.
    pub(crate) fn flush_all(&mut self, scope: Scope) {
        for v in 0..self.tlbs.len() {
            self.flush_one(v, scope);
        }
    }

    /// Flushes `scope` on the vCPUs of the mask at `mask`, read now (Xen's
    /// `vcpumask_to_pcpumask`; bits past the last vCPU are ignored).
    /// `EFAULT` for an address the guest did not make readable.
    pub(crate) fn flush_multi(&mut self, mask: *const u64, scope: Scope) -> Result<(), XenError> {
        let Some(word) = self.masks.iter().find(|m| m.as_ptr() == mask) else {
            return Err(XenError::Fault);
        };
        let bits = word.snapshot();
        for v in 0..self.tlbs.len() {
            if bits & (1 << v) != 0 {
                self.flush_one(v, scope);
            }
        }
        Ok(())
    }
}

impl XenModel {
    /// Simulates `n` vCPUs (1..=[`MODEL_MAX_VCPUS`]), every TLB empty,
    /// vCPU 0 issuing.
    pub fn set_vcpus(&mut self, n: usize) {
        let n = n.clamp(1, MODEL_MAX_VCPUS);
        self.vcpus.tlbs = (0..n).map(|_| BTreeMap::new()).collect();
        self.vcpus.current = 0;
    }

    /// Number of simulated vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus.tlbs.len()
    }

    /// The vCPU that issues the following hypercalls (clamped to the
    /// vCPUs there are).
    pub fn set_current_vcpu(&mut self, vcpu: usize) {
        self.vcpus.current = vcpu.min(self.vcpus.tlbs.len() - 1);
    }

    /// The vCPU issuing hypercalls.
    pub fn current_vcpu(&self) -> usize {
        self.vcpus.current
    }

    /// Lets `*_MULTI` operations name `mask` as their vCPU mask (Xen reads
    /// any guest address; the model reads only these, `EFAULT` otherwise).
    pub fn accept_vcpu_mask(&mut self, mask: &'static ActiveCpus) {
        self.vcpus.masks.push(mask);
    }

    /// vCPU `vcpu` reads through `va`: the L1 entry it uses, from its TLB
    /// if cached there (however stale), else walked from the kernel root
    /// and cached when present. `None`: not mapped (a fault).
    pub fn vcpu_translate(&mut self, vcpu: usize, va: u64) -> Option<u64> {
        if let Some(&e) = self.vcpus.tlbs.get(vcpu)?.get(&page(va)) {
            return Some(e);
        }
        let e = self.live_leaf(va)?;
        self.vcpus.tlbs.get_mut(vcpu)?.insert(page(va), e);
        Some(e)
    }

    /// The L1 entry `vcpu` has cached for `va`, if any (no walk).
    pub fn vcpu_cached(&self, vcpu: usize, va: u64) -> Option<u64> {
        self.vcpus.tlbs.get(vcpu)?.get(&page(va)).copied()
    }

    /// Every translation `vcpu` has cached, by page address.
    pub fn vcpu_tlb(&self, vcpu: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.vcpus
            .tlbs
            .get(vcpu)
            .into_iter()
            .flat_map(|t| t.iter().map(|(&va, &e)| (va, e)))
    }

    /// vCPU `vcpu` loads another root and back, or stops running this
    /// address space: its TLB is emptied (no global pages in the model).
    pub fn vcpu_reload(&mut self, vcpu: usize) {
        self.vcpus.flush_one(vcpu, Scope::All);
    }

    /// The present L1 entry mapping `va` under the kernel root now.
    pub fn live_leaf(&self, va: u64) -> Option<u64> {
        let (l1, index) = self.l1_slot_of(va).ok()?;
        let e = self.entry(l1, index);
        (e & PAGE_PRESENT != 0).then_some(e)
    }
}
