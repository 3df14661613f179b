using DmaBroker.Core;
using Google.Protobuf.WellKnownTypes;
using Google.Rpc;
using Grpc.Core;
using Grpc.Core.Interceptors;

namespace DmaBroker.Server.Hosting;

/// <summary>
/// The one place where core failures become wire errors: a <see cref="ErrnoException"/> turns
/// into the status code of its kind with a <c>google.rpc.ErrorInfo</c> whose reason is the errno
/// (SPEC §9). Anything else escaping a service is a bug, logged and reported as INTERNAL.
/// </summary>
public sealed partial class ErrorInterceptor(ILogger<ErrorInterceptor> logger) : Interceptor
{
    public const string ErrorDomain = "dmabroker";

    public override async Task<TResponse> UnaryServerHandler<TRequest, TResponse>(
        TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            return await continuation(request, context);
        }
        catch (Exception e) when (Translate(e, context) is { } rpc)
        {
            throw rpc;
        }
    }

    public override async Task ServerStreamingServerHandler<TRequest, TResponse>(
        TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context,
        ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            await continuation(request, responseStream, context);
        }
        catch (Exception e) when (Translate(e, context) is { } rpc)
        {
            throw rpc;
        }
    }

    public override async Task DuplexStreamingServerHandler<TRequest, TResponse>(
        IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream,
        ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            await continuation(requestStream, responseStream, context);
        }
        catch (Exception e) when (Translate(e, context) is { } rpc)
        {
            throw rpc;
        }
    }

    public override async Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(
        IAsyncStreamReader<TRequest> requestStream, ServerCallContext context,
        ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            return await continuation(requestStream, context);
        }
        catch (Exception e) when (Translate(e, context) is { } rpc)
        {
            throw rpc;
        }
    }

    /// <summary>The wire form of a core error.</summary>
    public static RpcException ToRpcException(ErrnoException e)
    {
        var status = new Google.Rpc.Status
        {
            Code = (int)ToStatusCode(e.Kind),
            Message = e.Message,
            Details =
            {
                Any.Pack(new ErrorInfo
                {
                    Reason = e.Errno.ToString(),
                    Domain = ErrorDomain,
                    Metadata = { ["errno"] = ((int)e.Errno).ToString(System.Globalization.CultureInfo.InvariantCulture) },
                }),
            },
        };
        return status.ToRpcException();
    }

    public static StatusCode ToStatusCode(ErrorKind kind) => kind switch
    {
        ErrorKind.InvalidArgument => StatusCode.InvalidArgument,
        ErrorKind.FailedPrecondition => StatusCode.FailedPrecondition,
        ErrorKind.NotFound => StatusCode.NotFound,
        ErrorKind.AlreadyExists => StatusCode.AlreadyExists,
        ErrorKind.ResourceExhausted => StatusCode.ResourceExhausted,
        ErrorKind.Unauthenticated => StatusCode.Unauthenticated,
        ErrorKind.PermissionDenied => StatusCode.PermissionDenied,
        _ => StatusCode.Internal,
    };

    // Returns null for exceptions that already speak gRPC (RpcException) or are the client going away.
    private RpcException? Translate(Exception e, ServerCallContext context)
    {
        switch (e)
        {
            case ErrnoException broker:
                LogRejected(logger, context.Method, broker.Errno, broker.Message);
                return ToRpcException(broker);
            case RpcException:
                return null;
            case OperationCanceledException or IOException when context.CancellationToken.IsCancellationRequested:
                return null;
            default:
                LogBug(logger, context.Method, e);
                return new RpcException(new Grpc.Core.Status(StatusCode.Internal, $"broker bug: {e.GetType().Name}; see the broker log"));
        }
    }

    [LoggerMessage(EventId = 100, Level = LogLevel.Debug, Message = "{Method} rejected: {Errno} {Reason}")]
    private static partial void LogRejected(ILogger logger, string method, Errno errno, string reason);

    [LoggerMessage(EventId = 101, Level = LogLevel.Error, Message = "{Method} failed with an unexpected exception (a broker bug)")]
    private static partial void LogBug(ILogger logger, string method, Exception exception);
}
