namespace DmaBroker.Core;

/// <summary>The Linux errno names the broker reports, as in <c>google.rpc.ErrorInfo.reason</c>.</summary>
public enum Errno
{
    EPERM = 1,
    EBADF = 9,
    ENOENT = 2,
    EFAULT = 14,
    EBUSY = 16,
    EEXIST = 17,
    ENODEV = 19,
    EINVAL = 22,
    ENOSPC = 28,
    ENOMEM = 12,
    EACCES = 13,
    E2BIG = 7,
    EIO = 5,
    EAGAIN = 11,
    EMFILE = 24,
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
    public Errno Errno { get; } = errno;
    public ErrorKind Kind { get; } = kind;

    public static ErrnoException Invalid(string message) => new(Errno.EINVAL, ErrorKind.InvalidArgument, message);
    public static ErrnoException Busy(string message) => new(Errno.EBUSY, ErrorKind.FailedPrecondition, message);
    public static ErrnoException Conflict(Errno errno, string message) => new(errno, ErrorKind.FailedPrecondition, message);
    public static ErrnoException NotPermitted(string message) => new(Errno.EPERM, ErrorKind.PermissionDenied, message);
    public static ErrnoException NotFound(Errno errno, string message) => new(errno, ErrorKind.NotFound, message);
    public static ErrnoException Exists(string message) => new(Errno.EEXIST, ErrorKind.AlreadyExists, message);
    public static ErrnoException Exhausted(Errno errno, string message) => new(errno, ErrorKind.ResourceExhausted, message);
    public static ErrnoException Fault(string message) => new(Errno.EFAULT, ErrorKind.InvalidArgument, message);
    public static ErrnoException Unauthenticated(string message) => new(Errno.EACCES, ErrorKind.Unauthenticated, message);
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

    public static ErrnoException NoDevice(PciAddress address) => NotFound(Errno.ENODEV, $"no device {address}");
    public static ErrnoException NoGroup(uint groupId) => NotFound(Errno.ENOENT, $"no IOMMU group {groupId}");
}
