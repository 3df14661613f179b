using Google.Rpc;
using Grpc.Core;

namespace DmaBroker.Client;

/// <summary>
/// A call the broker rejected. <see cref="Reason"/> is the Linux errno name (EBUSY, EPERM, ...)
/// from the error's <c>google.rpc.ErrorInfo</c>; <see cref="StatusCode"/> is the gRPC code.
/// </summary>
public sealed class BrokerException : Exception
{
    /// <summary>A rejection with its gRPC status code, errno name and message.</summary>
    public BrokerException(StatusCode statusCode, string reason, string message, Exception? inner = null)
        : base(message, inner)
    {
        StatusCode = statusCode;
        Reason = reason;
    }

    /// <summary>The gRPC status code.</summary>
    public StatusCode StatusCode { get; }

    /// <summary>The errno name, or the status code's name when the broker could not be reached.</summary>
    public string Reason { get; }

    /// <summary>True when the broker could not be reached or the connection was lost.</summary>
    public bool IsBrokerUnavailable => StatusCode is StatusCode.Unavailable or StatusCode.DeadlineExceeded;

    /// <summary>The errno and the message, as dmactl prints them.</summary>
    public override string ToString() => $"{Reason}: {Message}";

    /// <summary>Reads the errno out of a gRPC error.</summary>
    public static BrokerException From(RpcException e)
    {
        var info = e.GetRpcStatus()?.GetDetail<ErrorInfo>();
        var reason = info?.Reason is { Length: > 0 } r ? r : e.StatusCode.ToString();
        var message = e.StatusCode == StatusCode.Unavailable
            ? $"the broker is unavailable: {e.Status.Detail}"
            : e.Status.Detail;
        return new BrokerException(e.StatusCode, reason, message, e);
    }

    /// <summary>Runs a raw gRPC call, turning its <see cref="RpcException"/> into a <see cref="BrokerException"/>.</summary>
    public static async Task<T> Wrap<T>(Func<Task<T>> call)
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
