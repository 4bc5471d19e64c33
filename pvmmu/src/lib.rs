//! pvmmu: one page-table API for x86-64 kernels over two backends, Xen PV
//! (every live page-table write goes through the hypervisor, live tables are
//! read-only in every mapping) and native x86-64 paging.
#![no_std]
#![deny(missing_docs)]

#[cfg(any(test, feature = "model"))]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod backend;
pub mod bootstrap;
pub mod cpus;
pub mod entry;
pub mod install;
pub mod invariants;
pub mod kmap;
pub mod lazy;
pub mod lazy_task;
#[cfg(any(test, feature = "model"))]
pub mod model;
pub mod negative;
pub mod oracle;
pub mod phys;
pub mod shootdown;
pub mod space;
pub mod types;
pub mod walk;

pub use backend::{Backend, Native, XenPv};
pub use phys::{FrameAllocator, FrameMap, Identity, PhysMem};
pub use space::{AddressSpace, Error, Flush, Granule, Translation};
pub use types::{Mfn, Pfn, PAGE_SIZE};

/// The README's examples ("Using pvmmu from your kernel"), compiled and run
/// by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The examples of `docs/pvmmu-api.md`, compiled and run by
/// `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../docs/pvmmu-api.md")]
pub struct ApiDoctests;
