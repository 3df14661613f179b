namespace DmaBroker.Core;

/// <summary>The Linux errno names the broker reports, as in <c>google.rpc.ErrorInfo.reason</c>.</summary>
public enum Errno
{
    /// <summary>Operation not permitted: the group or device is owned by someone else.</summary>
    EPERM = 1,
    /// <summary>Bad file descriptor: a device handle that is not open in the session.</summary>
    EBADF = 9,
    /// <summary>No such entry: an unknown group, container, session or mapping.</summary>
    ENOENT = 2,
    /// <summary>Bad address: a range outside the session's memory.</summary>
    EFAULT = 14,
    /// <summary>Busy: the state forbids it now (owned, attached, open, still mapped).</summary>
    EBUSY = 16,
    /// <summary>Exists: overlaps a mapping or a device that is already there.</summary>
    EEXIST = 17,
    /// <summary>No such device, or the device is not bound to the driver the call needs.</summary>
    ENODEV = 19,
    /// <summary>Invalid argument, or a call that does not fit the current state (VFIO's usual answer).</summary>
    EINVAL = 22,
    /// <summary>No space: a count limit such as the container's mappings (dma_avail).</summary>
    ENOSPC = 28,
    /// <summary>Out of memory: the session's memory limit (like RLIMIT_MEMLOCK).</summary>
    ENOMEM = 12,
    /// <summary>Access denied: no or a bad credential, another principal's session token, or a role or group the principal lacks.</summary>
    EACCES = 13,
    /// <summary>Too big: a message over the broker's size limit.</summary>
    E2BIG = 7,
    /// <summary>I/O error: the device itself failed the operation.</summary>
    EIO = 5,
    /// <summary>Try again: Session.Open faster than the principal's rate allows.</summary>
    EAGAIN = 11,
    /// <summary>Too many open files: more live sessions than the principal's quota (a session is a file).</summary>
    EMFILE = 24,
    /// <summary>Function not implemented: a method the broker does not serve.</summary>
    ENOSYS = 38,
}

/// <summary>The nature of a failure; the edge maps it to a gRPC status code (SPEC §9).</summary>
public enum ErrorKind
{
    /// <summary>The request itself is malformed.</summary>
    InvalidArgument,
    /// <summary>The request conflicts with the current state.</summary>
    FailedPrecondition,
    /// <summary>An unknown id or address.</summary>
    NotFound,
    /// <summary>Overlaps something that exists.</summary>
    AlreadyExists,
    /// <summary>A limit was reached.</summary>
    ResourceExhausted,
    /// <summary>No, unknown or ended session.</summary>
    Unauthenticated,
    /// <summary>Owned by someone else, or not allowed to the caller.</summary>
    PermissionDenied,
    /// <summary>A method the broker does not serve.</summary>
    Unimplemented,
}

/// <summary>
/// A rejected broker operation. It carries the errno a Linux caller would see and the nature of
/// the failure; throwing it guarantees the operation changed no state.
/// </summary>
public sealed class ErrnoException(Errno errno, ErrorKind kind, string message) : Exception(message)
{
    /// <summary>The errno a Linux caller would see, reported as <c>ErrorInfo.reason</c>.</summary>
    public Errno Errno { get; } = errno;

    /// <summary>The nature of the failure, which picks the gRPC status code.</summary>
    public ErrorKind Kind { get; } = kind;

    /// <summary>When a retry may succeed (EAGAIN); sent as <c>google.rpc.RetryInfo</c>.</summary>
    public TimeSpan? RetryAfter { get; init; }

    /// <summary>EINVAL for a malformed request.</summary>
    public static ErrnoException Invalid(string message) => new(Errno.EINVAL, ErrorKind.InvalidArgument, message);

    /// <summary>EBUSY: the request conflicts with the current state.</summary>
    public static ErrnoException Busy(string message) => new(Errno.EBUSY, ErrorKind.FailedPrecondition, message);

    /// <summary>Any errno for a well-formed request the current state refuses (e.g. EINVAL where VFIO answers so).</summary>
    public static ErrnoException Conflict(Errno errno, string message) => new(errno, ErrorKind.FailedPrecondition, message);

    /// <summary>EPERM: someone else owns it.</summary>
    public static ErrnoException NotPermitted(string message) => new(Errno.EPERM, ErrorKind.PermissionDenied, message);

    /// <summary>An unknown id or address, with the errno Linux uses for that kind of object.</summary>
    public static ErrnoException NotFound(Errno errno, string message) => new(errno, ErrorKind.NotFound, message);

    /// <summary>EEXIST: it overlaps something that is already there.</summary>
    public static ErrnoException Exists(string message) => new(Errno.EEXIST, ErrorKind.AlreadyExists, message);

    /// <summary>A limit was reached (ENOSPC, ENOMEM, E2BIG).</summary>
    public static ErrnoException Exhausted(Errno errno, string message) => new(errno, ErrorKind.ResourceExhausted, message);

    /// <summary>EFAULT: an address range outside the session's memory.</summary>
    public static ErrnoException Fault(string message) => new(Errno.EFAULT, ErrorKind.InvalidArgument, message);

    /// <summary>EACCES, UNAUTHENTICATED: no, unknown or ended session.</summary>
    public static ErrnoException Unauthenticated(string message) => new(Errno.EACCES, ErrorKind.Unauthenticated, message);

    /// <summary>EACCES, PERMISSION_DENIED: the principal's role or allowed groups do not cover the call.</summary>
    public static ErrnoException Denied(string message) => new(Errno.EACCES, ErrorKind.PermissionDenied, message);

    /// <summary>
    /// Quotes caller input for an error message, cut to a short prefix: a message echoing a
    /// megabyte-long argument would not fit the HTTP/2 trailer it travels in (and helps nobody).
    /// </summary>
    public static string Quote(string? input) => input is null ? "''"
        : input.Length <= QuoteLimit ? $"'{input}'"
        : $"'{input[..QuoteLimit]}…' ({input.Length} characters)";

    /// <summary>The most characters of caller input an error message quotes.</summary>
    public const int QuoteLimit = 40;

    /// <summary>ENODEV, NOT_FOUND: no device at this address.</summary>
    public static ErrnoException NoDevice(PciAddress address) => NotFound(Errno.ENODEV, $"no device {address}");

    /// <summary>ENOENT, NOT_FOUND: no group with this id.</summary>
    public static ErrnoException NoGroup(uint groupId) => NotFound(Errno.ENOENT, $"no IOMMU group {groupId}");
}
