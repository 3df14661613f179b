using System.Collections.Frozen;
using DmaBroker.Protocol;
using Google.Rpc;
using Grpc.Core;

namespace DmaBroker.Client;

/// <summary>
/// A broker call that failed: the broker rejected it, or it could not reach the broker.
/// <see cref="Errno"/> is the Linux errno the broker reported (SPEC §9), <see cref="Reason"/> its
/// raw name, <see cref="StatusCode"/> the gRPC status of the failed call. Catch a subclass to tell
/// the failures a caller handles differently apart: <see cref="BrokerUnavailableException"/> (no
/// broker, or the connection was lost), <see cref="BrokerAuthenticationException"/> (no, unknown or
/// ended session), <see cref="DmaRequestException"/> (a device completed a DMA request with an error).
/// </summary>
public class BrokerException : Exception
{
    private static readonly FrozenDictionary<string, Errno> Known =
        Enum.GetValues<Errno>().Where(e => e != Errno.Unknown).ToFrozenDictionary(e => e.ToString(), StringComparer.Ordinal);

    /// <summary>A failure with its gRPC status code (null when no call failed), errno name and message.</summary>
    public BrokerException(StatusCode? statusCode, string reason, string message, Exception? inner = null)
        : base(message, inner)
    {
        StatusCode = statusCode;
        Reason = reason;
        Errno = Known.GetValueOrDefault(reason, Errno.Unknown);
    }

    /// <summary>
    /// The gRPC status of the failed call. Null when no call failed: a DMA request is answered
    /// inside its stream, so a device error carries only its errno (<see cref="DmaRequestException"/>).
    /// </summary>
    public StatusCode? StatusCode { get; }

    /// <summary>
    /// The errno parsed from <see cref="Reason"/>; <see cref="Errno.Unknown"/> when the reason is
    /// not an errno this client version knows, or when the broker sent none (it could not be reached).
    /// </summary>
    public Errno Errno { get; }

    /// <summary>
    /// The raw reason: the errno name exactly as the broker sent it (kept even when
    /// <see cref="Errno"/> is <see cref="Errno.Unknown"/>), or the status code's name when the broker
    /// sent no errno, as when it could not be reached.
    /// </summary>
    public string Reason { get; }

    /// <summary>The errno and the message, as dmactl prints them.</summary>
    public override string ToString() => $"{Reason}: {Message}";

    /// <summary>
    /// Reads the errno out of a gRPC error from a broker, as the library's own calls do: for callers
    /// of the raw clients (<see cref="BrokerClient.Raw"/>, <see cref="BrokerSession.Raw"/>). Returns the
    /// subclass that fits the failure.
    /// </summary>
    public static BrokerException From(RpcException e)
    {
        var errno = e.GetRpcStatus()?.GetDetail<ErrorInfo>() is { Domain: WireConstants.ErrorDomain, Reason: { Length: > 0 } r } ? r : null;
        var reason = errno ?? e.StatusCode.ToString();
        var detail = e.Status.Detail;
        return e.StatusCode switch
        {
            Grpc.Core.StatusCode.Unavailable => new BrokerUnavailableException(e.StatusCode, reason, $"the broker is unavailable: {detail}", e),
            // The call never reached a broker: the connection failed below gRPC, as a TLS handshake
            // with a plain-http listener does (gRPC reports that as INTERNAL, not UNAVAILABLE).
            Grpc.Core.StatusCode.Internal when errno is null && e.Status.DebugException is HttpRequestException =>
                new BrokerUnavailableException(e.StatusCode, reason, $"the broker is unavailable: {detail}", e),
            // The client's deadline ran out waiting: the broker did not answer. One the broker
            // reports itself, with its errno, is an ordinary rejection.
            Grpc.Core.StatusCode.DeadlineExceeded when errno is null => new BrokerUnavailableException(e.StatusCode, reason, detail, e),
            Grpc.Core.StatusCode.Unauthenticated => new BrokerAuthenticationException(reason, detail, e),
            _ => new BrokerException(e.StatusCode, reason, detail, e),
        };
    }

    /// <summary>Runs a raw gRPC call, turning its <see cref="RpcException"/> into a <see cref="BrokerException"/>.</summary>
    internal static async Task<T> Wrap<T>(Func<Task<T>> call)
    {
        try
        {
            return await call().ConfigureAwait(false);
        }
        catch (RpcException e)
        {
            throw From(e);
        }
    }
}

/// <summary>
/// The broker could not be reached, or the connection to it was lost (gRPC UNAVAILABLE, or a
/// deadline that ran out waiting for it). Nothing can be said about whether the call took effect;
/// a session whose connection is lost ends, and the broker releases what it held.
/// </summary>
public sealed class BrokerUnavailableException(StatusCode statusCode, string reason, string message, Exception? inner = null)
    : BrokerException(statusCode, reason, message, inner);

/// <summary>
/// The broker did not accept the call's identity (gRPC UNAUTHENTICATED, errno EACCES): no session
/// token, an unknown one, or one whose session has ended (revoked, lease lost, disposed).
/// Opening a new session is the way on; the old one is gone with everything it held.
/// </summary>
public sealed class BrokerAuthenticationException(string reason, string message, Exception? inner = null)
    : BrokerException(Grpc.Core.StatusCode.Unauthenticated, reason, message, inner);
