//! What a loader hands a guest at entry, parsed and checked before use:
//! the command line (Xen's `start_info.cmd_line` or PVH's
//! `hvm_start_info.cmdline_paddr`).
//!
//! Invariant: everything here is plain data in, typed result out (no
//! hypercall, no raw pointer), so it builds and is tested on the host with
//! crafted inputs; the kernel copies the loader's bytes and hands them here.

pub mod cmdline;
