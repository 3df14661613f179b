using System.Net.Sockets;
using System.Security.Authentication;
using DmaBroker.Client;
using Grpc.Core;

namespace DmaBroker.Ctl;

/// <summary>
/// Why a dmactl command failed, as its exit code, a kind (<c>usage</c>, <c>rejected</c>,
/// <c>unreachable</c>), a Linux errno name and number, and a message.
/// </summary>
internal sealed record Failure(int ExitCode, string Kind, string Errno, int? Code, string Message, string Text)
{
    /// <summary>A command-line mistake: exit 2, EINVAL; <paramref name="hint"/> goes on a line of its own for people.</summary>
    public static Failure Usage(string message, string? hint = null) =>
        new(Cli.Usage, "usage", "EINVAL", 22, message, hint is null ? message : $"{message}\n{hint}");

    /// <summary>The broker said no: exit 1, with the errno it sent.</summary>
    public static Failure Rejected(BrokerException e) =>
        new(Cli.Rejected, "rejected", e.Reason, e.Errno == Client.Errno.Unknown ? null : (int)e.Errno, OneLine(e.Message), $"{e.Reason}: {OneLine(e.Message)}");

    /// <summary>The device's DMA faulted in the IOMMU (say, an injected fault): exit 1, EFAULT, with the IOVA, access and reason.</summary>
    public static Failure DmaFault(DmaFaultException e) =>
        new(Cli.Rejected, "rejected", "EFAULT", 14, e.Message, $"EFAULT: {e.Message}");

    /// <summary>
    /// No broker to talk to, or it went away: exit 3. <paramref name="what"/> says which ("cannot
    /// reach the broker at …"); the message adds the root cause. The errno is the socket's where
    /// there is one (ECONNREFUSED, ECONNRESET, …), EPROTO for a failed TLS handshake, ENOTCONN otherwise.
    /// </summary>
    public static Failure Unreachable(string what, Exception cause)
    {
        var (errno, code) = SocketErrno(cause);
        var message = OneLine($"{what}: {Causes(cause).Last().Message.TrimEnd('.')} ({errno})");
        return new(Cli.Unreachable, "unreachable", errno, code, message, message);
    }

    // The exception and what caused it, outermost first; gRPC keeps the transport's exception in the status.
    private static IEnumerable<Exception> Causes(Exception cause)
    {
        for (Exception? e = cause; e is not null; e = e.InnerException ?? (e as RpcException)?.Status.DebugException)
            yield return e;
    }

    private static (string, int) SocketErrno(Exception cause)
    {
        foreach (var e in Causes(cause))
        {
            switch (e)
            {
                case SocketException s:
                    return s.SocketErrorCode switch
                    {
                        SocketError.ConnectionRefused => ("ECONNREFUSED", 111),
                        SocketError.ConnectionReset or SocketError.ConnectionAborted => ("ECONNRESET", 104),
                        SocketError.HostUnreachable or SocketError.HostNotFound or SocketError.HostDown => ("EHOSTUNREACH", 113),
                        SocketError.NetworkUnreachable or SocketError.NetworkDown => ("ENETUNREACH", 101),
                        SocketError.TimedOut => ("ETIMEDOUT", 110),
                        SocketError.AddressNotAvailable => ("ENOENT", 2), // a Unix socket path that does not exist
                        _ => ("ENOTCONN", 107),
                    };
                case AuthenticationException:
                    return ("EPROTO", 71);
                case IOException when e.Message.Contains("ended prematurely", StringComparison.OrdinalIgnoreCase):
                    return ("ECONNRESET", 104);
            }
        }
        return ("ENOTCONN", 107);
    }

    private static string OneLine(string text) => text.ReplaceLineEndings(" ").Trim();
}
