//! Prints the negative suite's answers from the Xen model, one
//! `NEGATIVE <name> <errno-name> <errno>` line per case, in the order the
//! guest kernel prints them under real Xen, so that the two lists can be
//! compared line by line.
//!
//! Invariant: the model plays the hardware domain (dom0), as the reference
//! kernel is under real Xen; exit status 0 unless the model could not boot.

use pvmmu::model::{DomainKind, ModelNegativeEnv};
use pvmmu::negative::{run, Line};

fn main() {
    let mut env = match ModelNegativeEnv::new(DomainKind::Hardware, 16 * 1024) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("negative-model: the model could not boot: {e}");
            std::process::exit(1);
        }
    };
    run(&mut env, &mut |name, result| {
        println!("{}", Line { name, result });
    });
}
