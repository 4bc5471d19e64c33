//! Which kind of Xen guest `--mode xl` creates: `--guest pv` (the default)
//! or `--guest pvh`. The same kernel ELF serves both: Xen's PV builder
//! enters it at its PV entry note, the PVH builder at its
//! `XEN_ELFNOTE_PHYS32_ENTRY` (the entry QEMU's `-kernel` uses natively).
//!
//! Invariant: the `xl` configuration's `type` and the `platform` a passing
//! report must show are decided here, together, from the one choice.

/// The guest type `xl create` builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Guest {
    /// A paravirtualised guest: pvmmu's Xen PV backend.
    #[default]
    Pv,
    /// A PVH guest (an HVM container without emulated devices): pvmmu's
    /// native backend, hardware walks the tables.
    Pvh,
}

impl Guest {
    /// The name on the command line (`--guest pv|pvh`).
    pub fn name(self) -> &'static str {
        match self {
            Guest::Pv => "pv",
            Guest::Pvh => "pvh",
        }
    }

    /// Parses a `--guest` value.
    pub fn from_name(name: &str) -> Option<Guest> {
        match name {
            "pv" => Some(Guest::Pv),
            "pvh" => Some(Guest::Pvh),
            _ => None,
        }
    }

    /// The `type` line's value in the `xl` configuration.
    pub fn xl_type(self) -> &'static str {
        self.name()
    }

    /// The report's `platform` when the kernel runs as this guest.
    pub fn platform(self) -> &'static str {
        match self {
            Guest::Pv => "xen-pv",
            Guest::Pvh => "xen-pvh",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_decide_type_and_platform() {
        for guest in [Guest::Pv, Guest::Pvh] {
            assert_eq!(Guest::from_name(guest.name()), Some(guest));
        }
        assert_eq!(Guest::from_name("hvm"), None);
        assert_eq!(Guest::default(), Guest::Pv);
        assert_eq!(
            (Guest::Pvh.xl_type(), Guest::Pvh.platform()),
            ("pvh", "xen-pvh")
        );
        assert_eq!(
            (Guest::Pv.xl_type(), Guest::Pv.platform()),
            ("pv", "xen-pv")
        );
    }
}
