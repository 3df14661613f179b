using DmaBroker.Core;
using DmaBroker.Core.Sessions;
using Grpc.Core;

namespace DmaBroker.Server.Hosting;

/// <summary>The session token travels in call metadata, as a file descriptor travels with a syscall.</summary>
public static class SessionAuthentication
{
    public const string TokenHeader = Protocol.WireConstants.SessionTokenHeader;

    /// <summary>
    /// The live session named by the call's token, which the call's own principal opened;
    /// UNAUTHENTICATED otherwise (another principal's token counts as unknown).
    /// </summary>
    public static Session Authenticate(this Broker broker, ServerCallContext context) =>
        broker.Sessions.Authenticate(context.RequestHeaders.GetValue(TokenHeader), context.Caller().Principal);

    /// <summary>
    /// Who made the call, as <see cref="AccessGate"/> established it before the call ran. Every
    /// gRPC request passes the gate, so a call without one is refused rather than trusted.
    /// </summary>
    public static Caller Caller(this ServerCallContext context) =>
        context.GetHttpContext().Features.Get<Caller>()
            ?? throw ErrnoException.Unauthenticated("the call was not authenticated by the broker's access gate");
}
