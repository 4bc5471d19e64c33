//! Xen's error numbers (`xen/include/public/errno.h`) as a typed enum.
//!
//! Invariant: `XenError::from_raw(e.raw()) == e` for every variant, and a
//! number Xen may add later maps to [`XenError::Other`] instead of being lost.

/// An error number returned by a hypercall (Xen returns `-errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XenError {
    /// `EPERM` (1): operation not permitted, e.g. a frame the domain does not own.
    Perm,
    /// `ENOENT` (2): no such entry.
    NoEnt,
    /// `ESRCH` (3): no such domain or vCPU.
    Srch,
    /// `EINTR` (4): interrupted.
    Intr,
    /// `EIO` (5): I/O error.
    Io,
    /// `ENXIO` (6): no such device or address.
    NxIo,
    /// `E2BIG` (7): argument list too long.
    TooBig,
    /// `EAGAIN` (11): try again (Xen may also restart the call itself).
    Again,
    /// `ENOMEM` (12): out of memory.
    NoMem,
    /// `EACCES` (13): permission denied.
    Acces,
    /// `EFAULT` (14): a guest handle could not be read or written.
    Fault,
    /// `EBUSY` (16): resource busy, e.g. pinning an already-pinned table.
    Busy,
    /// `EEXIST` (17): already exists.
    Exist,
    /// `EXDEV` (18): cross-domain operation.
    XDev,
    /// `ENODEV` (19): no such device.
    NoDev,
    /// `EINVAL` (22): invalid argument, e.g. a page-type or validation failure.
    Inval,
    /// `ENOSPC` (28): no space left.
    NoSpc,
    /// `ERANGE` (34): result out of range.
    Range,
    /// `ENOSYS` (38): hypercall or sub-operation not implemented.
    NoSys,
    /// `EOPNOTSUPP` (95): operation not supported.
    OpNotSupp,
    /// `ERESTART` (85): Xen-internal restart marker; a guest should not see it.
    Restart,
    /// Any other error number, kept as Xen returned it (positive).
    Other(i64),
}

impl XenError {
    /// Converts a positive error number into a [`XenError`].
    pub const fn from_errno(errno: i64) -> Self {
        match errno {
            1 => Self::Perm,
            2 => Self::NoEnt,
            3 => Self::Srch,
            4 => Self::Intr,
            5 => Self::Io,
            6 => Self::NxIo,
            7 => Self::TooBig,
            11 => Self::Again,
            12 => Self::NoMem,
            13 => Self::Acces,
            14 => Self::Fault,
            16 => Self::Busy,
            17 => Self::Exist,
            18 => Self::XDev,
            19 => Self::NoDev,
            22 => Self::Inval,
            28 => Self::NoSpc,
            34 => Self::Range,
            38 => Self::NoSys,
            85 => Self::Restart,
            95 => Self::OpNotSupp,
            other => Self::Other(other),
        }
    }

    /// The positive error number.
    pub const fn errno(self) -> i64 {
        match self {
            Self::Perm => 1,
            Self::NoEnt => 2,
            Self::Srch => 3,
            Self::Intr => 4,
            Self::Io => 5,
            Self::NxIo => 6,
            Self::TooBig => 7,
            Self::Again => 11,
            Self::NoMem => 12,
            Self::Acces => 13,
            Self::Fault => 14,
            Self::Busy => 16,
            Self::Exist => 17,
            Self::XDev => 18,
            Self::NoDev => 19,
            Self::Inval => 22,
            Self::NoSpc => 28,
            Self::Range => 34,
            Self::NoSys => 38,
            Self::Restart => 85,
            Self::OpNotSupp => 95,
            Self::Other(n) => n,
        }
    }

    /// The symbolic name (`"EINVAL"`), or `"E?"` for [`XenError::Other`].
    pub const fn name(self) -> &'static str {
        match self {
            Self::Perm => "EPERM",
            Self::NoEnt => "ENOENT",
            Self::Srch => "ESRCH",
            Self::Intr => "EINTR",
            Self::Io => "EIO",
            Self::NxIo => "ENXIO",
            Self::TooBig => "E2BIG",
            Self::Again => "EAGAIN",
            Self::NoMem => "ENOMEM",
            Self::Acces => "EACCES",
            Self::Fault => "EFAULT",
            Self::Busy => "EBUSY",
            Self::Exist => "EEXIST",
            Self::XDev => "EXDEV",
            Self::NoDev => "ENODEV",
            Self::Inval => "EINVAL",
            Self::NoSpc => "ENOSPC",
            Self::Range => "ERANGE",
            Self::NoSys => "ENOSYS",
            Self::Restart => "ERESTART",
            Self::OpNotSupp => "EOPNOTSUPP",
            Self::Other(_) => "E?",
        }
    }

    /// Interprets a raw hypercall return value: `Ok(value)` when it is not
    /// negative, otherwise the error it encodes.
    pub const fn check(ret: i64) -> Result<i64, XenError> {
        if ret < 0 {
            Err(Self::from_errno(-ret))
        } else {
            Ok(ret)
        }
    }
}

impl core::fmt::Display for XenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), self.errno())
    }
}

#[cfg(test)]
mod tests {
    use super::XenError;

    #[test]
    fn round_trips_every_number() {
        for n in 1..200 {
            assert_eq!(XenError::from_errno(n).errno(), n);
        }
        assert_eq!(XenError::check(-22), Err(XenError::Inval));
        assert_eq!(XenError::check(0), Ok(0));
        assert_eq!(XenError::check(-1).map_err(XenError::name), Err("EPERM"));
    }
}
