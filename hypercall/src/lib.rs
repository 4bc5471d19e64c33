//! The Xen hypercall ABI boundary for pvmmu and the reference kernel.
//!
//! * [`abi`]: the structures passed to Xen, layouts checked at compile time.
//! * [`boot`]: what the loader hands the guest at entry, parsed and checked
//!   (host-testable).
//! * [`raw`]: the hypercall instruction (`syscall` from PV kernel mode, or a
//!   call into the hypercall page of an HVM/PVH guest).
//! * [`hvm`]: what an HVM/PVH guest needs first: Xen's CPUID leaves, the
//!   hypercall page, the HVM parameters of its PV console.
//! * [`mmu`]: the MMU hypercalls behind the [`MmuHypercalls`] trait, with the
//!   real implementation [`Xen`]; pvmmu's host tests substitute a model.
//! * [`ops`]: console, scheduler, version, memory map, event channels, timer.
//! * [`XenError`]: Xen's error numbers as an enum.
//!
//! Invariant: nothing here issues a hypercall unless the caller has asserted,
//! through an `unsafe` constructor or function, that it runs as a PV guest
//! or as an HVM/PVH guest whose hypercall page is installed.
#![no_std]
#![deny(missing_docs)]

pub mod abi;
pub mod boot;
mod errno;
pub mod hvm;
pub mod mmu;
pub mod ops;
pub mod raw;

pub use errno::XenError;
pub use mmu::{BatchError, Call, HypercallStats, MmuExt, MmuHypercalls, MmuUpdate, PinLevel, Xen};
