//! Xen's page-type and entry rules: taking and dropping type references,
//! validating (promoting) a frame into a page table and tearing it down
//! (demoting), and checking one new entry at each level.
//!
//! Invariant: a type reference is taken exactly once per present entry that
//! Xen counts (a writable L1 mapping of a guest frame; an L2..L4 entry to the
//! next lower table; a read-only entry to another same-level table, the
//! "linear" case), plus one per pin and per loaded root, and dropped exactly
//! once when that entry, pin or root goes away; a table whose count reaches
//! zero is demoted, dropping the references its entries held.

use hypercall::XenError;

use super::{
    DomainKind, Owner, PageType, TypeWord, XenModel, ENTRY_MFN_MASK, MMIO_MFN_LIMIT, PAGE_ACCESSED,
    PAGE_DIRTY, PAGE_GLOBAL, PAGE_GUEST_KERNEL, PAGE_PCD, PAGE_PRESENT, PAGE_PSE, PAGE_PWT,
    PAGE_RW, PAGE_USER, XEN_L4_FIRST, XEN_L4_LAST, XEN_MFN_BASE,
};
use crate::types::{Mfn, ENTRIES};

/// Flag bits refused in L2, L3 and L4 entries of a 64-bit PV guest
/// (`base_disallow_mask`: PWT, PCD, PSE, GLOBAL).
pub(crate) const UPPER_DISALLOW: u64 = PAGE_PWT | PAGE_PCD | PAGE_PSE | PAGE_GLOBAL;
/// Cache attribute bits of an L1 entry (PWT, PCD, PAT).
pub(crate) const CACHE_ATTRS: u64 = PAGE_PWT | PAGE_PCD | PAGE_PSE;
/// Entry bits whose change forces re-validation (everything but the
/// fast-path whitelist: NX, available bits, G, D, A, U).
const REVALIDATE_MASK: u64 = ENTRY_MFN_MASK | PAGE_PRESENT | PAGE_RW | CACHE_ATTRS;
/// `INVALID_MFN` as an L1 entry can encode it (`PADDR_MASK >> PAGE_SHIFT`).
const INVALID_ENTRY_MFN: u64 = ENTRY_MFN_MASK >> 12;

pub(crate) fn entry_mfn(e: u64) -> u64 {
    (e & ENTRY_MFN_MASK) >> 12
}

pub(crate) fn is_xen_l4_slot(index: usize) -> bool {
    (XEN_L4_FIRST..=XEN_L4_LAST).contains(&index)
}

/// What Xen adds to a present entry of `level` it accepts
/// (`adjust_guest_l1e`..`adjust_guest_l4e` for a 64-bit guest).
pub(crate) fn adjust(level: u8, e: u64) -> u64 {
    if e & PAGE_PRESENT == 0 {
        return e;
    }
    match level {
        1 => {
            let mut e = e;
            if e & PAGE_USER == 0 {
                e |= PAGE_GUEST_KERNEL | PAGE_USER;
            }
            if e & PAGE_GUEST_KERNEL == 0 {
                e |= PAGE_GLOBAL | PAGE_USER;
            }
            e
        }
        2 | 3 => e | PAGE_USER,
        _ => e | PAGE_ACCESSED | PAGE_USER,
    }
}

impl XenModel {
    /// Flag bits refused in a present L1 entry of this domain
    /// (`l1_disallow_mask`).
    pub(crate) fn l1_disallow(&self) -> u64 {
        match self.kind {
            DomainKind::Unprivileged => CACHE_ATTRS,
            DomainKind::Hardware => 0,
        }
    }

    fn guest(&self, mfn: u64) -> bool {
        self.owner(Mfn(mfn)) == Owner::Guest
    }

    /// Takes a type reference of `ty` on guest frame `mfn`, validating it as
    /// a table when its type changes (`_get_page_type`). A half-validated
    /// table (see "stuck tables" below) asked for its own type resumes its
    /// validation where it stopped, and the caller takes over the
    /// reference it held.
    pub(crate) fn get_page_type(&mut self, mfn: u64, ty: PageType) -> Result<(), XenError> {
        let mut tw = self.tyword(mfn);
        if tw.count >= Self::type_count_max() {
            return Err(XenError::Inval);
        }
        if tw.count == 0 {
            tw = TypeWord {
                ty: ty.code(),
                pinned: false,
                validated: ty == PageType::Writable,
                count: 1,
            };
            self.set_tyword(mfn, tw);
            let level = ty.level();
            if level == 0 {
                return Ok(());
            }
            self.linear.remove(&mfn);
            self.finish_promote(mfn, ty, 0)
        } else if let (true, Some(&from)) = (
            tw.page_type() == ty && !tw.validated,
            self.partial.get(&mfn),
        ) {
            // Resume (`PGT_partial` cleared, the count of 1 kept).
            self.partial.remove(&mfn);
            self.finish_promote(mfn, ty, from)
        } else if tw.page_type() != ty || !tw.validated {
            // The wrong type is held, or the frame is half-way through its
            // own validation (where Xen would wait; only reachable through
            // recursion, which Xen also refuses), or stuck half-validated.
            Err(XenError::Inval)
        } else {
            tw.count += 1;
            self.set_tyword(mfn, tw);
            Ok(())
        }
    }

    /// Validates `mfn` as a table of `ty` from entry `from` on, with its
    /// type word already set (count 1, not validated); on failure the frame
    /// is left half-validated if Xen leaves it so, else untyped.
    fn finish_promote(&mut self, mfn: u64, ty: PageType, from: usize) -> Result<(), XenError> {
        match self.promote(mfn, ty.level(), from) {
            Ok(()) => {
                let mut now = self.tyword(mfn);
                now.validated = true;
                self.set_tyword(mfn, now);
                self.take_shadow(mfn);
                Ok(())
            }
            Err(e) => {
                if !self.partial.contains_key(&mfn) {
                    self.set_tyword(mfn, TypeWord::default());
                    self.linear.remove(&mfn);
                }
                Err(e)
            }
        }
    }

    /// Ends the current hypercall's partial validation, if any
    /// (`put_old_guest_table`): the half-validated table drops the
    /// references of the entries it had validated and loses its type.
    pub(crate) fn put_old_table(&mut self) {
        if let Some(old) = self.old_table.take() {
            self.drop_partial(old);
        }
    }

    /// Drops a half-validated table's references and its type.
    fn drop_partial(&mut self, mfn: u64) {
        let Some(done) = self.partial.remove(&mfn) else {
            return;
        };
        let level = self.tyword(mfn).page_type().level();
        for j in (0..done).rev() {
            if level == 4 && is_xen_l4_slot(j) {
                continue;
            }
            let e = self.mem_read(mfn, j);
            self.put_entry(level, e, mfn);
        }
        self.set_tyword(mfn, TypeWord::default());
        self.linear.remove(&mfn);
    }

    /// Drops a type reference on `mfn`; the last one on a table demotes it
    /// (`_put_page_type`).
    pub(crate) fn put_page_type(&mut self, mfn: u64) {
        let mut tw = self.tyword(mfn);
        if tw.count == 0 {
            return;
        }
        tw.count -= 1;
        let level = tw.page_type().level();
        if tw.count == 0 && level != 0 && tw.validated {
            tw.validated = false;
            tw.pinned = false;
            self.set_tyword(mfn, tw);
            self.demote(mfn, level);
        } else {
            if tw.count == 0 {
                tw.pinned = false;
            }
            self.set_tyword(mfn, tw);
        }
    }

    /// Validates every guest entry of `mfn` from `from` on as a table of
    /// `level`, taking the references they need and writing back the
    /// adjusted entries (`promote_l1_table`..`promote_l4_table`).
    ///
    /// On failure at entry `i`: an L1 drops every reference it took at
    /// once. An L2..L4 that fails at `i > 0` keeps them and becomes the
    /// hypercall's `old_guest_table` (dropped at its end,
    /// [`XenModel::put_old_table`]).
    ///
    /// Stuck tables: if `old_guest_table` is already set at that point
    /// (a lower table failed at an entry > 0 inside this one), an L3/L4
    /// whose failing entry `i` points to that lower table takes over its
    /// clean-up; otherwise (an L2, or the lower table sits behind an
    /// intermediate table that failed at entry 0) Xen 4.17 and 4.20
    /// overwrite `old_guest_table` (an `ASSERT` only in debug builds) and
    /// the lower table stays half-validated, type count 1, for good: every
    /// write to it and every other use of it is refused with `EINVAL` until
    /// something asks for its own type again, which resumes its validation.
    fn promote(&mut self, mfn: u64, level: u8, from: usize) -> Result<(), XenError> {
        for i in from..ENTRIES {
            if level == 4 && is_xen_l4_slot(i) {
                continue;
            }
            let e = self.mem_read(mfn, i);
            if e & PAGE_PRESENT == 0 {
                continue;
            }
            let got = if level == 1 {
                self.get_l1e(e).map(|flip| e ^ flip)
            } else {
                self.get_upper(level, e, mfn).map(|()| e)
            };
            match got {
                Ok(e) => self.write_entry(mfn, i, adjust(level, e)),
                Err(err) if level == 1 => {
                    for j in (0..i).rev() {
                        let e = self.mem_read(mfn, j);
                        self.put_entry(level, e, mfn);
                    }
                    return Err(err);
                }
                Err(err) => {
                    if i > 0 {
                        if let Some(prev) = self.old_table.take() {
                            if level >= 3 && prev == entry_mfn(e) {
                                // The clean-up of `mfn` covers `prev`.
                                self.drop_partial(prev);
                            }
                            // Else: `prev` stays stuck.
                        }
                        self.partial.insert(mfn, i);
                        self.old_table = Some(mfn);
                    }
                    return Err(err);
                }
            }
        }
        if level == 4 {
            self.init_xen_l4_slots(mfn, false);
        }
        Ok(())
    }

    /// Drops the references held by every entry of the (former) table
    /// `mfn` of `level`, reading what Xen validated (`demote_l*_table`).
    fn demote(&mut self, mfn: u64, level: u8) {
        let entries: alloc::boxed::Box<[u64; ENTRIES]> = match self.shadows.get(&mfn) {
            Some(s) => s.clone(),
            None => return,
        };
        self.drop_shadow(mfn);
        for (i, &e) in entries.iter().enumerate() {
            if level == 4 && is_xen_l4_slot(i) {
                continue;
            }
            self.put_entry(level, e, mfn);
        }
    }

    /// Xen's own L4 slots (`init_xen_l4_slots`): slot 256 the read-only M2P
    /// (only when `ro_mpt`), 257 MMCFG, 258 the linear self-map, 260 the
    /// per-domain area, 261.. Xen's image and direct map; the rest zero.
    pub(crate) fn init_xen_l4_slots(&mut self, l4: u64, ro_mpt: bool) {
        const HYP_RW: u64 = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_DIRTY | super::PAGE_NX;
        const HYP_RX: u64 = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_DIRTY;
        for slot in XEN_L4_FIRST..=XEN_L4_LAST {
            let xen = |k: u64| (XEN_MFN_BASE + k) << 12;
            let val = match slot {
                256 if ro_mpt => self.ro_mpt_entry(),
                257 => xen(1) | HYP_RW,
                258 => (l4 << 12) | HYP_RW,
                260 => xen(2) | HYP_RW,
                261 => xen(3) | HYP_RX,
                262 => xen(4) | HYP_RW,
                _ => 0,
            };
            self.write_entry(l4, slot, val);
        }
    }

    /// The L4 entry of the read-only M2P (slot 256).
    pub(crate) fn ro_mpt_entry(&self) -> u64 {
        (XEN_MFN_BASE << 12) | PAGE_PRESENT | PAGE_USER | PAGE_ACCESSED | super::PAGE_NX
    }

    /// Checks a present L1 entry and takes what it needs
    /// (`get_page_from_l1e`): `Ok(bits Xen flips)` or the error.
    pub(crate) fn get_l1e(&mut self, e: u64) -> Result<u64, XenError> {
        if e & self.l1_disallow() != 0 {
            return Err(XenError::Inval);
        }
        let mfn = entry_mfn(e);
        match self.owner(Mfn(mfn)) {
            Owner::Io | Owner::NotRam => {
                let permitted = self.kind == DomainKind::Hardware && mfn < MMIO_MFN_LIMIT;
                if !permitted {
                    return Err(if mfn == INVALID_ENTRY_MFN {
                        XenError::Inval
                    } else {
                        XenError::Perm
                    });
                }
                // MMIO is never mapped write-back: WB becomes UC, WT/WP
                // gain PCD.
                Ok(match e & CACHE_ATTRS {
                    0 => PAGE_PWT | PAGE_PCD,
                    a if a == PAGE_PWT || a == PAGE_PWT | PAGE_PSE => PAGE_PCD,
                    _ => 0,
                })
            }
            Owner::Guest => {
                if e & PAGE_RW != 0 && self.get_page_type(mfn, PageType::Writable).is_err() {
                    return Err(XenError::Busy);
                }
                Ok(0)
            }
            Owner::Xen | Owner::OtherDomain | Owner::Free => Err(XenError::Busy),
        }
    }

    /// Drops what a present L1 entry held (`put_page_from_l1e`).
    pub(crate) fn put_l1e(&mut self, e: u64) {
        if e & PAGE_PRESENT == 0 || e & PAGE_RW == 0 {
            return;
        }
        let mfn = entry_mfn(e);
        if self.guest(mfn) {
            self.put_page_type(mfn);
        }
    }

    /// Checks a present L2/L3/L4 entry of table `container` and takes the
    /// reference to the next lower table, or the linear-table reference
    /// (`get_page_from_l2e`..`get_page_from_l4e`).
    pub(crate) fn get_upper(&mut self, level: u8, e: u64, container: u64) -> Result<(), XenError> {
        if e & UPPER_DISALLOW != 0 {
            return Err(XenError::Inval);
        }
        let mfn = entry_mfn(e);
        let lower = PageType::table(level - 1).unwrap_or(PageType::L1);
        let rc = if self.guest(mfn) {
            self.get_page_type(mfn, lower)
        } else {
            Err(XenError::Inval)
        };
        match rc {
            Err(XenError::Inval) if self.get_linear(level, e, container) => Ok(()),
            other => other,
        }
    }

    /// The linear page-table case: a read-only entry pointing to the table
    /// itself, or to another validated table of the same level
    /// (`get_l*_linear_pagetable`).
    fn get_linear(&mut self, level: u8, e: u64, container: u64) -> bool {
        if e & PAGE_RW != 0 {
            return false;
        }
        let mfn = entry_mfn(e);
        if mfn == container {
            return true;
        }
        if !self.guest(container) || !self.guest(mfn) {
            return false;
        }
        // The container must not itself be used as a linear table, the
        // target must not itself hold linear entries.
        if self.linear_count(Mfn(container)) < 0 || self.linear_count(Mfn(mfn)) > 0 {
            return false;
        }
        let mut tw = self.tyword(mfn);
        if tw.page_type().level() != level
            || !tw.validated
            || tw.count == 0
            || tw.count >= Self::type_count_max()
        {
            return false;
        }
        tw.count += 1;
        self.set_tyword(mfn, tw);
        self.linear_add(container, 1);
        self.linear_add(mfn, -1);
        true
    }

    /// Drops what a present L2/L3/L4 entry of `container` held
    /// (`put_page_from_l2e`..`put_page_from_l4e`).
    pub(crate) fn put_upper(&mut self, level: u8, e: u64, container: u64) {
        if e & PAGE_PRESENT == 0 {
            return;
        }
        let mfn = entry_mfn(e);
        if mfn == container || !self.guest(mfn) {
            return;
        }
        if self.tyword(mfn).page_type().level() == level {
            self.linear_add(mfn, 1);
            self.linear_add(container, -1);
        }
        self.put_page_type(mfn);
    }

    /// Drops what entry `e` of a `level` table `container` held.
    pub(crate) fn put_entry(&mut self, level: u8, e: u64, container: u64) {
        if level == 1 {
            self.put_l1e(e);
        } else {
            self.put_upper(level, e, container);
        }
    }

    /// Changes entry `index` of the live `level` table `container` to `new`
    /// (`mod_l1_entry`..`mod_l4_entry`).
    pub(crate) fn mod_entry(
        &mut self,
        level: u8,
        container: u64,
        index: usize,
        new: u64,
        preserve_ad: bool,
    ) -> Result<(), XenError> {
        if level == 4 && is_xen_l4_slot(index) {
            return Err(XenError::Inval);
        }
        let old = self.entry(container, index);
        let ad = if preserve_ad {
            old & (PAGE_ACCESSED | PAGE_DIRTY)
        } else {
            0
        };
        if new & PAGE_PRESENT != 0 {
            let disallow = if level == 1 {
                self.l1_disallow()
            } else {
                UPPER_DISALLOW
            };
            if new & disallow != 0 {
                return Err(XenError::Inval);
            }
            let mut new = adjust(level, new);
            if (old ^ new) & REVALIDATE_MASK == 0 {
                // Only whitelisted bits change: no re-validation.
                self.write_entry(container, index, new | ad);
                return Ok(());
            }
            if level == 1 {
                new ^= self.get_l1e(new)?;
            } else {
                self.get_upper(level, new, container)?;
            }
            self.write_entry(container, index, new | ad);
        } else {
            self.write_entry(container, index, new | ad);
        }
        self.put_entry(level, old, container);
        Ok(())
    }
}
