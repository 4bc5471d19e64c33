//! Lazy-MMU batches: many address-space calls, one drain.
//!
//! Invariant: inside a [`LazyBatch`] calls queue their writes without
//! draining; every read (translate, the walks of later calls) already sees
//! the queued values; the batch is drained when the guard ends — by
//! [`LazyBatch::finish`], which returns the result, or by `Drop`, which
//! keeps a failure for the next call on the address space to report. A TLB
//! flush inside the batch drains first, so no flush ever precedes the write
//! it is for. Batches nest; only the outermost drains.

use core::ops::{Deref, DerefMut};

use crate::backend::Backend;
use crate::phys::FrameAllocator;
use crate::space::{AddressSpace, Error};

/// An open lazy batch on an address space (derefs to it).
pub struct LazyBatch<'a, B: Backend, A: FrameAllocator> {
    space: &'a mut AddressSpace<B, A>,
    finished: bool,
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// Opens a lazy batch: calls made through the guard are drained
    /// together when it ends.
    pub fn lazy(&mut self) -> LazyBatch<'_, B, A> {
        self.enter_lazy();
        LazyBatch {
            space: self,
            finished: false,
        }
    }
}

impl<B: Backend, A: FrameAllocator> LazyBatch<'_, B, A> {
    /// Ends the batch, draining it (when outermost), and reports the result.
    pub fn finish(mut self) -> Result<(), Error> {
        self.finished = true;
        self.space.leave_lazy()
    }
}

impl<B: Backend, A: FrameAllocator> Deref for LazyBatch<'_, B, A> {
    type Target = AddressSpace<B, A>;
    fn deref(&self) -> &Self::Target {
        self.space
    }
}

impl<B: Backend, A: FrameAllocator> DerefMut for LazyBatch<'_, B, A> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.space
    }
}

impl<B: Backend, A: FrameAllocator> Drop for LazyBatch<'_, B, A> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.space.leave_lazy() {
                self.space.set_sticky(e);
            }
        }
    }
}
