namespace DmaBroker.Client;

/// <summary>
/// The Linux errno of a broker error, with Linux's numbers: every broker error names one in its
/// <c>google.rpc.ErrorInfo</c> (SPEC §9), and the broker answers error code for error code as Linux
/// VFIO would. <see cref="Unknown"/> stands for a reason this client version does not know, or for
/// a failure that carried none; <see cref="BrokerException.Reason"/> keeps the raw string either way.
/// </summary>
public enum Errno
{
    /// <summary>No errno this client knows: a newer broker's reason, or no reason at all (see <see cref="BrokerException.Reason"/>).</summary>
    Unknown = 0,

    /// <summary>Operation not permitted: the group or device is owned by someone else (a kernel driver or another session).</summary>
    EPERM = 1,

    /// <summary>No such entry: an unknown group, container, mapping or session.</summary>
    ENOENT = 2,

    /// <summary>I/O error: the device reported an error (e.g. edu DMA programmed outside its buffer).</summary>
    EIO = 5,

    /// <summary>Argument list too long: a message over the 16 MiB limit.</summary>
    E2BIG = 7,

    /// <summary>Bad file descriptor: an unknown or closed device handle.</summary>
    EBADF = 9,

    /// <summary>Try again: a rate limit (SPEC §12), with a retry hint.</summary>
    EAGAIN = 11,

    /// <summary>Out of memory: over the session's memory limit.</summary>
    ENOMEM = 12,

    /// <summary>Permission denied: no, unknown or ended session token, or a role or group the principal lacks.</summary>
    EACCES = 13,

    /// <summary>Bad address: memory outside the session's allocated blocks.</summary>
    EFAULT = 14,

    /// <summary>Device or resource busy: the request conflicts with the current state (a claimed group, an open device, mapped memory).</summary>
    EBUSY = 16,

    /// <summary>Exists: overlaps a mapping or a device that exists.</summary>
    EEXIST = 17,

    /// <summary>No such device: an unknown address, or a device not bound to vfio-pci.</summary>
    ENODEV = 19,

    /// <summary>Invalid argument: the request is malformed, or releases what is not held.</summary>
    EINVAL = 22,

    /// <summary>Too many open files: more sessions than the principal's quota (a session is a file).</summary>
    EMFILE = 24,

    /// <summary>No space left: a container, mapping or DMA stream limit was reached.</summary>
    ENOSPC = 28,

    /// <summary>A method this broker does not serve (UNIMPLEMENTED).</summary>
    ENOSYS = 38,

    /// <summary>Protocol error: the broker answered something this client cannot place.</summary>
    EPROTO = 71,

    /// <summary>Timed out: an operation the broker bounds in time did not finish.</summary>
    ETIMEDOUT = 110,

    /// <summary>Operation cancelled: the DMA channel was closed before the request completed.</summary>
    ECANCELED = 125,
}
