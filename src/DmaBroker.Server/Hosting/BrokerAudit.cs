using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Protocol;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Hosting;

/// <summary>What an audit event records (SPEC §13): an ownership change or an admin action.</summary>
public enum AuditAction
{
    /// <summary>User ownership of a group taken, or one more claim on it (SetContainer, BindDevice).</summary>
    Claim,
    /// <summary>User ownership given back, by the session's call or by its end (UnsetContainer, UnbindDevice, teardown).</summary>
    Release,
    /// <summary>A kernel driver bound (sysfs bind).</summary>
    DriverBind,
    /// <summary>A kernel driver unbound (sysfs unbind).</summary>
    DriverUnbind,
    /// <summary>A device hot-added.</summary>
    DeviceAdd,
    /// <summary>A device hot-removed.</summary>
    DeviceRemove,
    /// <summary>A session revoked by an admin or by its own principal.</summary>
    SessionRevoke,
    /// <summary>A fault injected on a device, or faults cleared (SPEC §14).</summary>
    FaultInject,
}

/// <summary>
/// The audit log (category <see cref="Category"/>, so operators can route it): one event per
/// ownership change and per admin action, successful or refused, each with the principal, the
/// session, the group, the grant's generation and the outcome (<c>ok</c> or the errno).
/// Successful claims and releases come from the journal (<see cref="Record"/>), which sees every
/// one whatever path made it; refusals and admin actions from the calls (<see cref="AuditInterceptor"/>,
/// <see cref="AccessGate"/>). docs/logging.md explains why no event can be missed or doubled.
/// </summary>
public sealed partial class BrokerAudit(ILoggerFactory loggers)
{
    /// <summary>The logging category of every audit event.</summary>
    public const string Category = "DmaBroker.Audit";

    /// <summary>The outcome of an action that succeeded.</summary>
    public const string Ok = "ok";

    private readonly ILogger _logger = loggers.CreateLogger(Category);

    /// <summary>A claim or release the journal published. Runs under the group's lock: it only logs.</summary>
    public void Record(OwnershipChange change)
    {
        var detail = change.SessionEnd is { } end
            ? $"owner count {change.OwnerCountAfter}; the session ended: {end}"
            : $"owner count {change.OwnerCountAfter}";
        Write(change.IsClaim ? AuditAction.Claim : AuditAction.Release, change.Principal, change.SessionId, change.GroupId, change.Generation, Ok, detail);
    }

    /// <summary>Writes one audit event.</summary>
    public void Write(AuditAction action, string principal, ulong sessionId, uint groupId, ulong generation, string outcome, string detail) =>
        Events[(int)action](_logger, outcome, principal, sessionId, groupId, generation, detail);

    // Each action's event, in AuditAction's order.
    private static readonly Action<ILogger, string, string, ulong, uint, ulong, string>[] Events =
        [LogClaim, LogRelease, LogDriverBind, LogDriverUnbind, LogDeviceAdd, LogDeviceRemove, LogSessionRevoke, LogFaultInject];

    // One event id per action, the same fields in each, so a query or a route works on all of them.
    private const string Fields = "{Outcome}: principal {Principal}, session {SessionId}, group {GroupId}, generation {Generation}; {Detail}";

    [LoggerMessage(EventId = 1000, EventName = "Claim", Level = LogLevel.Information, Message = "audit claim " + Fields)]
    private static partial void LogClaim(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);

    [LoggerMessage(EventId = 1001, EventName = "Release", Level = LogLevel.Information, Message = "audit release " + Fields)]
    private static partial void LogRelease(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);

    [LoggerMessage(EventId = 1002, EventName = "DriverBind", Level = LogLevel.Information, Message = "audit driver-bind " + Fields)]
    private static partial void LogDriverBind(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);

    [LoggerMessage(EventId = 1003, EventName = "DriverUnbind", Level = LogLevel.Information, Message = "audit driver-unbind " + Fields)]
    private static partial void LogDriverUnbind(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);

    [LoggerMessage(EventId = 1004, EventName = "DeviceAdd", Level = LogLevel.Information, Message = "audit device-add " + Fields)]
    private static partial void LogDeviceAdd(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);

    [LoggerMessage(EventId = 1005, EventName = "DeviceRemove", Level = LogLevel.Information, Message = "audit device-remove " + Fields)]
    private static partial void LogDeviceRemove(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);

    [LoggerMessage(EventId = 1006, EventName = "SessionRevoke", Level = LogLevel.Information, Message = "audit session-revoke " + Fields)]
    private static partial void LogSessionRevoke(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);

    [LoggerMessage(EventId = 1007, EventName = "FaultInject", Level = LogLevel.Information, Message = "audit fault-inject " + Fields)]
    private static partial void LogFaultInject(ILogger logger, string outcome, string principal, ulong sessionId, uint groupId, ulong generation, string detail);
}

/// <summary>
/// Audits the calls that claim, release or act as the kernel (<see cref="AuditedCall"/>): every
/// refusal with its errno, and every admin action that succeeded. A claim or release that
/// succeeded is left to the journal (<see cref="BrokerAudit.Record"/>), so it is audited once.
/// Runs inside <see cref="ErrorInterceptor"/>, where the core's errors are still typed.
/// </summary>
public sealed class AuditInterceptor(Broker broker, BrokerAudit audit) : Interceptor
{
    public override async Task<TResponse> UnaryServerHandler<TRequest, TResponse>(
        TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        if (AuditedCall.Of(context.Method, request) is not { } call)
            return await continuation(request, context);
        var principal = context.GetHttpContext().Features.Get<Caller>()?.Principal ?? AuditedCall.Unauthenticated;
        // Resolved before the call: a removed device's group is gone after it.
        var before = call.Resolve(broker.Journal.Current);
        TResponse response;
        try
        {
            response = await continuation(request, context);
        }
        catch (ErrnoException e)
        {
            var session = call.Action is AuditAction.Claim or AuditAction.Release ? CallerSession(context) : before.Session;
            audit.Write(call.Action, principal, session, before.Group, before.Generation, e.Errno.ToString(), call.Detail);
            throw;
        }
        if (call.Action is not (AuditAction.Claim or AuditAction.Release))
        {
            // A hot-added device's group exists only after the call.
            var after = before.Group == 0 && call.Action == AuditAction.DeviceAdd ? call.Resolve(broker.Journal.Current) : before;
            audit.Write(call.Action, principal, after.Session, after.Group, after.Generation, BrokerAudit.Ok, call.Detail);
        }
        return response;
    }

    // The caller's own session, when its token names one; a refused claim may carry none.
    private ulong CallerSession(ServerCallContext context)
    {
        try
        {
            return broker.Authenticate(context).Id;
        }
        catch (ErrnoException)
        {
            return 0;
        }
    }
}

/// <summary>One call that the audit log records, with what it names: a group, a device or a session.</summary>
/// <param name="Action">What the call does.</param>
/// <param name="GroupId">The group it names, or null when it names a device or a session.</param>
/// <param name="Address">The device it names, or null.</param>
/// <param name="SessionId">The session it names (a revocation), or 0.</param>
/// <param name="Detail">The call and its arguments, in words.</param>
public sealed record AuditedCall(AuditAction Action, uint? GroupId, string? Address, ulong SessionId, string Detail)
{
    /// <summary>The principal of a call refused before it was authenticated.</summary>
    public const string Unauthenticated = "unauthenticated";

    private static readonly Dictionary<string, AuditAction> Actions = new(StringComparer.Ordinal)
    {
        [Path(Wire.Vfio.Descriptor, nameof(Wire.Vfio.VfioBase.SetContainer))] = AuditAction.Claim,
        [Path(Wire.Vfio.Descriptor, nameof(Wire.Vfio.VfioBase.BindDevice))] = AuditAction.Claim,
        [Path(Wire.Vfio.Descriptor, nameof(Wire.Vfio.VfioBase.UnsetContainer))] = AuditAction.Release,
        [Path(Wire.Vfio.Descriptor, nameof(Wire.Vfio.VfioBase.UnbindDevice))] = AuditAction.Release,
        [Path(Wire.Kernel.Descriptor, nameof(Wire.Kernel.KernelBase.BindDriver))] = AuditAction.DriverBind,
        [Path(Wire.Kernel.Descriptor, nameof(Wire.Kernel.KernelBase.UnbindDriver))] = AuditAction.DriverUnbind,
        [Path(Wire.Kernel.Descriptor, nameof(Wire.Kernel.KernelBase.AddDevice))] = AuditAction.DeviceAdd,
        [Path(Wire.Kernel.Descriptor, nameof(Wire.Kernel.KernelBase.RemoveDevice))] = AuditAction.DeviceRemove,
        [Path(Wire.Kernel.Descriptor, nameof(Wire.Kernel.KernelBase.RevokeSession))] = AuditAction.SessionRevoke,
        [Path(Wire.Kernel.Descriptor, nameof(Wire.Kernel.KernelBase.InjectFault))] = AuditAction.FaultInject,
        [Path(Wire.Kernel.Descriptor, nameof(Wire.Kernel.KernelBase.ClearFaults))] = AuditAction.FaultInject,
    };

    /// <summary>The action a method (<c>/package.Service/Method</c>) performs, or null when it is not audited.</summary>
    public static AuditAction? ActionOf(string? method) => method is not null && Actions.TryGetValue(method, out var action) ? action : null;

    /// <summary>The audited call a request of <paramref name="method"/> makes, or null when it is not audited.</summary>
    public static AuditedCall? Of(string method, object request)
    {
        if (ActionOf(method) is not { } action)
            return null;
        return request switch
        {
            Wire.SetContainerRequest r => new(action, r.GroupId, null, 0, $"SetContainer container {r.ContainerId}"),
            Wire.UnsetContainerRequest r => new(action, r.GroupId, null, 0, "UnsetContainer"),
            Wire.BindDeviceRequest r => new(action, null, r.Address, 0, $"BindDevice {ErrnoException.Quote(r.Address)} container {r.ContainerId}"),
            Wire.UnbindDeviceRequest r => new(action, null, r.Address, 0, $"UnbindDevice {ErrnoException.Quote(r.Address)}"),
            Wire.BindDriverRequest r => new(action, null, r.Address, 0, $"BindDriver {ErrnoException.Quote(r.Address)} {ErrnoException.Quote(r.Driver)}"),
            Wire.UnbindDriverRequest r => new(action, null, r.Address, 0, $"UnbindDriver {ErrnoException.Quote(r.Address)}"),
            Wire.AddDeviceRequest r => new(action, null, r.Address, 0, $"AddDevice {ErrnoException.Quote(r.Address)} model {ErrnoException.Quote(r.Model)} driver {ErrnoException.Quote(r.Driver)}"),
            Wire.RemoveDeviceRequest r => new(action, null, r.Address, 0, $"RemoveDevice {ErrnoException.Quote(r.Address)}"),
            Wire.RevokeSessionRequest r => new(action, null, null, r.SessionId, $"RevokeSession {r.SessionId} {ErrnoException.Quote(r.Reason)}"),
            Wire.InjectFaultRequest r => new(action, null, r.Address, 0, $"InjectFault {ErrnoException.Quote(r.Address)} {FaultNames.Describe(r)}"),
            Wire.ClearFaultsRequest r => new(action, null, r.Address, 0, $"ClearFaults {(r.Address.Length == 0 ? "every device" : ErrnoException.Quote(r.Address))}"),
            _ => null,
        };
    }

    /// <summary>
    /// The group the call concerns as the table shows it: its id and generation, and the session
    /// the call names, else the group's user owner (0 when none). Zeros for what does not exist.
    /// </summary>
    public (uint Group, ulong Generation, ulong Session) Resolve(TopologySnapshot table)
    {
        var groupId = GroupId;
        if (groupId is null && PciAddress.TryParse(Address, out var address) && table.Devices.TryGetValue(address, out var device))
            groupId = device.GroupId;
        if (groupId is not { } id || !table.Groups.TryGetValue(id, out var group))
            return (groupId ?? 0, 0, SessionId);
        return (id, group.Generation, SessionId != 0 ? SessionId : group.OwnerSession);
    }

    private static string Path(Google.Protobuf.Reflection.ServiceDescriptor service, string method) => $"/{service.FullName}/{method}";
}
