using DmaBroker.Core;
using Google.Protobuf;
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
    public const string ErrorDomain = Protocol.WireConstants.ErrorDomain;

    /// <summary>The largest message the broker receives.</summary>
    public const int MaxMessageSize = Protocol.WireConstants.MaxMessageSize;

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

    /// <summary>
    /// Middleware for the errors gRPC raises before any interceptor runs (a unary request over the
    /// message size limit, a method the broker does not serve): it adds the ErrorInfo detail every
    /// other error carries, E2BIG and ENOSYS.
    /// </summary>
    public static Task AddErrnoToFrameworkErrors(HttpContext context, RequestDelegate next)
    {
        // Such an error goes out as a trailers-only response: the status travels in the headers.
        context.Response.OnStarting(static state =>
        {
            var http = (HttpContext)state;
            var headers = http.Response.Headers;
            if (headers.ContainsKey("grpc-status-details-bin"))
                return Task.CompletedTask;
            var message = Uri.UnescapeDataString(headers["grpc-message"].ToString());
            ErrnoException? error = headers["grpc-status"].ToString() switch
            {
                "8" => ErrnoException.Exhausted(Errno.E2BIG, $"{message} (the broker accepts messages up to {MaxMessageSize} bytes)"),
                "12" => new ErrnoException(Errno.ENOSYS, ErrorKind.Unimplemented, $"{ErrnoException.Quote(http.Request.Path.Value)}: {message} (this broker serves the dmabroker.v1 services, grpc.health.v1 and server reflection)"),
                _ => null,
            };
            if (error is not null)
            {
                var status = GrpcErrors.ToStatus(error);
                headers["grpc-message"] = GrpcErrors.PercentEncode(status.Message);
                headers["grpc-status-details-bin"] = Convert.ToBase64String(status.ToByteArray());
            }
            return Task.CompletedTask;
        }, context);
        return next(context);
    }

    /// <summary>The longest error message the broker sends, in characters.</summary>
    public const int MaxErrorMessage = 1024;

    /// <summary>The wire form of a core error.</summary>
    public static RpcException ToRpcException(ErrnoException e)
    {
        var status = new Google.Rpc.Status
        {
            Code = (int)ToStatusCode(e.Kind),
            // Messages quote input cut short already; this bound keeps any message inside the trailer.
            Message = e.Message.Length <= MaxErrorMessage ? e.Message : e.Message[..MaxErrorMessage] + "…",
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
        if (e.RetryAfter is { } wait)
            status.Details.Add(Any.Pack(new RetryInfo { RetryDelay = Duration.FromTimeSpan(wait) }));
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
        ErrorKind.Unimplemented => StatusCode.Unimplemented,
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
            case RpcException { StatusCode: StatusCode.ResourceExhausted } tooBig when tooBig.GetRpcStatus() is null:
                // gRPC's own message-size limit: give it the errno every other error carries.
                return ToRpcException(ErrnoException.Exhausted(Errno.E2BIG, $"{tooBig.Status.Detail} (the broker accepts messages up to {MaxMessageSize} bytes)"));
            case RpcException:
                return null;
            case OperationCanceledException or IOException:
                // Only the transport throws these here: the client cancelled, reset its stream or
                // lost its connection, and the call's token may not show it yet. Not a broker error.
                LogClientGone(logger, context.Method, e.Message);
                // As a status, not the transport's exception, which grpc-dotnet would log as an error.
                return new RpcException(new Grpc.Core.Status(StatusCode.Cancelled, "the client went away"));
            default:
                LogBug(logger, context.Method, e);
                return new RpcException(new Grpc.Core.Status(StatusCode.Internal, $"broker bug: {e.GetType().Name}; see the broker log"));
        }
    }

    [LoggerMessage(EventId = 100, EventName = "CallRejected", Level = LogLevel.Debug, Message = "{Method} rejected: {Errno} {Reason}")]
    private static partial void LogRejected(ILogger logger, string method, Errno errno, string reason);

    [LoggerMessage(EventId = 102, EventName = "ClientGone", Level = LogLevel.Debug, Message = "{Method}: the client went away ({Reason})")]
    private static partial void LogClientGone(ILogger logger, string method, string reason);

    [LoggerMessage(EventId = 101, EventName = "BrokerBug", Level = LogLevel.Error, Message = "{Method} failed with an unexpected exception (a broker bug)")]
    private static partial void LogBug(ILogger logger, string method, Exception exception);
}
