using DmaBroker.Core;
using DmaBroker.Core.Sessions;
using Grpc.Core;

namespace DmaBroker.Server.Hosting;

/// <summary>The session token travels in call metadata, as a file descriptor travels with a syscall.</summary>
public static class SessionAuthentication
{
    public const string TokenHeader = Protocol.WireConstants.SessionTokenHeader;

    /// <summary>The live session named by the call's token; UNAUTHENTICATED otherwise.</summary>
    public static Session Authenticate(this Broker broker, ServerCallContext context) =>
        broker.Sessions.Authenticate(context.RequestHeaders.GetValue(TokenHeader));
}
