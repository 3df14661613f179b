using System.CommandLine;
using System.Globalization;
using System.Numerics;
using DmaBroker.Protocol.V1;
using Spectre.Console;

namespace DmaBroker.Ctl;

/// <summary>Every dmactl command: its arguments, options and what it does.</summary>
internal static class Commands
{
    private static readonly Argument<uint> GroupId = Number<uint>("group", "An IOMMU group number", "14");
    internal static readonly Argument<string> Address = new("address") { Description = "A device's PCI address, DDDD:BB:DD.F, such as 0000:08:00.0" };
    private static readonly Argument<string> Driver = new("driver") { Description = "A driver name, such as vfio-pci", HelpName = "driver" };
    private static readonly Option<bool> Force = new("--force") { Description = "Bind a driver name dmactl does not know", Arity = ArgumentArity.Zero };
    private static readonly Option<bool> Iommufd = new("--iommufd") { Description = "Use an iommufd IOAS instead of a type1v2 container", Arity = ArgumentArity.Zero };
    private static readonly Argument<ulong> SessionId = Number<ulong>("session", "A session id (see 'dmactl sessions')", "3");
    private static readonly Argument<string[]> Reason = new("reason") { Description = "Why, as the session is told", Arity = ArgumentArity.ZeroOrMore };
    private static readonly Argument<string> Shell = new Argument<string>("shell") { Description = "The shell: bash" }.AcceptOnlyFromAmong("bash");

    private const string Description = """
        dmactl: drive a DmaBroker from the shell.

        Exit codes: 0 ok, 1 the broker rejected the request (the errno is printed),
        2 usage error, 3 the broker is unreachable (connection or TLS failure, or it went away).
        """;

    public static RootCommand Root()
    {
        var root = new RootCommand(Description)
        {
            Cli.Broker, Cli.Token, Cli.CaCert, Cli.Cert, Cli.Key, Cli.Json,
            Define("devices", "List PCI devices: address, ids, class, model, group and driver.", DevicesAsync),
            Define("groups", "List IOMMU groups: owner kind, owner count, owning session, generation, domain, devices.", GroupsAsync),
            Define("group", "Show one IOMMU group.", GroupAsync, GroupId),
            Define("watch", "Print a snapshot, then every group and device change as it happens, until Ctrl-C (--json: one object per line). Exits 3 if the broker goes away.", WatchAsync),
            Define("hold", "Open a session, claim the group with SetContainer, and hold it until Ctrl-C; the broker releases it when dmactl exits, however it exits.", HoldAsync, GroupId, Iommufd),
            Define("bind", $"Bind a driver to a device, as the kernel would (admin). Known drivers: {DriverNames.Describe()}; another name needs --force.", BindAsync, Address, Driver, Force),
            Define("unbind", "Unbind a device's driver (admin).", UnbindAsync, Address),
            Define("revoke", "End a session; the broker tells it why and releases everything it held (admin: any session; user: its own).", RevokeAsync, SessionId, Reason),
            Define("sessions", "List live sessions, oldest first: id, principal, client name, peer, age, groups held, memory and DMA streams (and, on a replica of a cluster, the replica serving each).", SessionsAsync),
            Define("stats", "Live sessions, containers, user-owned groups and watchers.", StatsAsync),
            Define("topology", "Print the running topology as a topology file, which the broker's --topology reads (docs/topology.md).", TopologyAsync),
            Define("dma", "Claim the device's group, map memory, and run a DMA round trip: the device writes a pattern, the CPU checks it, the device reads it back.", DeviceCommands.DmaAsync, [Address, DeviceCommands.Bytes]),
            Define("bench", "Claim the device's group and measure DMA write throughput (a progress bar on stderr when it is a terminal).", DeviceCommands.BenchAsync, [Address, DeviceCommands.Size, DeviceCommands.Seconds, DeviceCommands.Window]),
            Define("fault", "Inject a fault into a device (admin; SPEC §14): iommu-fault, device-error, drop-interrupt, delay-interrupt and slow-reset arm on the device's next events; surprise-remove and link-down act at once.",
                FaultCommands.FaultAsync, [Address, FaultCommands.Kind, FaultCommands.Count, FaultCommands.DelayMs, FaultCommands.Status, FaultCommands.Probability,
                    FaultCommands.Seed, FaultCommands.Opcode, FaultCommands.LbaStart, FaultCommands.LbaCount]),
            Define("faults", "List injected faults: id, address, kind, settings and how often each fired; with --clear, remove a device's faults (admin).", FaultCommands.FaultsAsync, FaultCommands.Clear),
            Define("version", "Print dmactl's version.", VersionAsync),
            Define("completion", "Print a shell script that completes dmactl's commands and options: eval \"$(dmactl completion bash)\".", CompletionAsync, Shell),
        };
        Driver.CompletionSources.Add(DriverNames.All.ToArray());
        return root;
    }

    private static Command Define(string name, string description, Func<CommandContext, Task<int>> run, params Symbol[] symbols)
    {
        var command = new Command(name, description);
        foreach (var symbol in symbols)
        {
            switch (symbol)
            {
                case Argument argument:
                    command.Arguments.Add(argument);
                    break;
                case Option option:
                    command.Options.Add(option);
                    break;
            }
        }
        Cli.Handle(command, run);
        return command;
    }

    /// <summary>A whole-number argument with a message that says what it wants, not which CLR type failed to parse.</summary>
    internal static Argument<T> Number<T>(string name, string description, string example) where T : struct, IBinaryInteger<T> => new(name)
    {
        Description = $"{description}, such as {example}",
        CustomParser = result =>
        {
            var text = result.Tokens.Single().Value;
            if (T.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var value))
                return value;
            result.AddError($"<{name}> must be a whole number such as {example}, got '{text}'");
            return default;
        },
    };

    private static async Task<int> DevicesAsync(CommandContext c)
    {
        var response = await c.Client.ListDevicesAsync(c.Stop);
        if (c.Output.Json)
        {
            c.Output.Message(response);
            return Cli.Ok;
        }
        c.Output.Table(["ADDRESS", "ID", "CLASS", "MODEL", "GROUP", "DRIVER"],
            response.Devices.Select(d => new Cell[]
            {
                d.Address, $"{Output.Hex(d.VendorId, 4)}:{Output.Hex(d.DeviceId, 4)}", Output.Hex(d.ClassCode, 6), d.Model,
                Number(d.GroupId), DriverCell(d),
            }));
        return Cli.Ok;
    }

    private static async Task<int> GroupsAsync(CommandContext c)
    {
        var response = await c.Client.ListGroupsAsync(c.Stop);
        if (c.Output.Json)
            c.Output.Message(response);
        else
            c.Output.Table(GroupHeader, response.Groups.Select(GroupRow));
        return Cli.Ok;
    }

    private static async Task<int> GroupAsync(CommandContext c)
    {
        var group = await c.Client.GetGroupAsync(c.Value(GroupId), c.Stop);
        if (c.Output.Json)
            c.Output.Message(group);
        else
            c.Output.Table(GroupHeader, [GroupRow(group)]);
        return Cli.Ok;
    }

    private static async Task<int> WatchAsync(CommandContext c)
    {
        try
        {
            await foreach (var ev in c.Client.WatchAsync(c.Stop))
            {
                if (c.Output.Json)
                    c.Output.Message(ev);
                else
                    c.Output.Line(Describe(ev));
                // Each event as it happens, even into a pipe.
                await c.Output.Writer.FlushAsync(c.Stop);
            }
        }
        catch (Client.BrokerUnavailableException e)
        {
            return c.Output.Fail(Failure.Unreachable($"lost the broker at {c.BrokerAddress}", e));
        }
        // The broker ends a watch only when it shuts down.
        return c.Output.Fail(Failure.Unreachable($"lost the broker at {c.BrokerAddress}", new IOException("it ended the watch")));
    }

    private static string Describe(WatchEvent ev) => ev.EventCase switch
    {
        WatchEvent.EventOneofCase.Snapshot => $"rev {ev.Revision}  snapshot: {ev.Snapshot.Groups.Count} groups, {ev.Snapshot.Devices.Count} devices, {ev.Snapshot.Groups.Count(g => g.OwnerKind == OwnerKind.User)} user-owned",
        WatchEvent.EventOneofCase.Group => $"rev {ev.Revision}  group {ev.Group.Id}: {Owner(ev.Group)}, count {ev.Group.OwnerCount}, generation {ev.Group.Generation}, domain {Name(ev.Group.Domain)}",
        WatchEvent.EventOneofCase.Device => $"rev {ev.Revision}  device {ev.Device.Address}: driver {(ev.Device.Driver.Length == 0 ? "none" : ev.Device.Driver)}, group {ev.Device.GroupId}",
        WatchEvent.EventOneofCase.DeviceRemoved => $"rev {ev.Revision}  device {ev.DeviceRemoved.Address} removed",
        WatchEvent.EventOneofCase.GroupRemoved => $"rev {ev.Revision}  group {ev.GroupRemoved.GroupId} removed",
        WatchEvent.EventOneofCase.SessionEnded => $"rev {ev.Revision}  session {ev.SessionEnded.SessionId} ended ({ev.SessionEnded.Reason}); all it held is released",
        _ => $"rev {ev.Revision}  (unknown event)",
    };

    private static async Task<int> HoldAsync(CommandContext c)
    {
        var groupId = c.Value(GroupId);
        var type = c.Value(Iommufd) ? ContainerType.Iommufd : ContainerType.Type1V2;
        await using var session = await c.Client.OpenSessionAsync("dmactl hold", c.Stop);
        var container = await session.CreateContainerAsync(type, c.Stop);
        await session.SetContainerAsync(groupId, container, c.Stop);
        var group = await c.Client.GetGroupAsync(groupId, c.Stop);
        if (c.Output.Json)
            c.Output.Message(group);
        else
            c.Output.Line($"holding group {groupId} as session {session.Id} (container {container}, generation {group.Generation}); Ctrl-C to release");
        await c.Output.Writer.FlushAsync(c.Stop);
        var stopped = Task.Delay(Timeout.Infinite, c.Stop);
        if (await Task.WhenAny(session.Ended, stopped) == session.Ended)
        {
            await c.Output.ErrorWriter.WriteLineAsync($"dmactl: session {session.Id} ended: {await session.Ended}");
            return Cli.Rejected;
        }
        if (!c.Output.Json)
            c.Output.Line($"released group {groupId}");
        return Cli.Ok;
    }

    private static async Task<int> BindAsync(CommandContext c)
    {
        var driver = c.Value(Driver);
        if (!c.Value(Force) && !DriverNames.All.Contains(driver, StringComparer.Ordinal))
        {
            var closest = Spelling.Closest(driver, DriverNames.All);
            throw new UsageException($"unknown driver '{driver}'{(closest is null ? "" : $"; did you mean '{closest}'?")} Known drivers: {DriverNames.Describe()}. Use --force to bind it anyway.");
        }
        return PrintDevice(c, await c.Client.Admin.BindDriverAsync(c.Value(Address), driver, c.Stop));
    }

    private static async Task<int> UnbindAsync(CommandContext c) =>
        PrintDevice(c, await c.Client.Admin.UnbindDriverAsync(c.Value(Address), c.Stop));

    private static async Task<int> RevokeAsync(CommandContext c)
    {
        var id = c.Value(SessionId);
        await c.Client.Admin.RevokeSessionAsync(id, string.Join(' ', c.Value(Reason) ?? []), c.Stop);
        c.Output.Result($"revoked session {id}; everything it held is released", ("sessionId", id), ("revoked", true));
        return Cli.Ok;
    }

    private static async Task<int> StatsAsync(CommandContext c)
    {
        var stats = await c.Client.Admin.GetStatsAsync(c.Stop);
        if (c.Output.Json)
            c.Output.Message(stats);
        else
            c.Output.Table(["SESSIONS", "CONTAINERS", "USER-OWNED", "WATCHERS", "OPENED", "CLOSED", "MEMORY", "DEVICES", "STREAMS", "MAPPINGS"],
                [[.. new ulong[] { stats.Sessions, stats.Containers, stats.UserOwnedGroups, stats.Watchers, stats.SessionsOpened, stats.SessionsClosed,
                    stats.MemoryBytes, stats.OpenDevices, stats.DmaStreams, stats.Mappings }.Select(v => (Cell)Number(v))]]);
        return Cli.Ok;
    }

    private static async Task<int> SessionsAsync(CommandContext c)
    {
        var sessions = await c.Client.Admin.ListSessionsAsync(c.Stop);
        if (c.Output.Json)
        {
            var response = new ListSessionsResponse();
            response.Sessions.AddRange(sessions);
            c.Output.Message(response);
            return Cli.Ok;
        }
        // A replica of a cluster (SPEC §16) names itself on each of its sessions; a single broker
        // names none, and its table keeps the columns it always had.
        var clustered = sessions.Any(s => s.Replica.Length > 0);
        string[] columns = ["SESSION", "PRINCIPAL", "CLIENT", "PEER", "AGE", "GROUPS", "MEMORY", "STREAMS"];
        c.Output.Table(clustered ? [.. columns, "REPLICA"] : columns,
            sessions.Select(s =>
            {
                Cell[] cells =
                [
                    Number(s.SessionId), s.Principal, s.ClientName, s.Peer,
                    Age(TimeSpan.FromMilliseconds(s.AgeMs)),
                    s.Groups.Count == 0 ? "-" : string.Join(",", s.Groups),
                    Number(s.MemoryBytes),
                    Number(s.DmaStreams),
                ];
                return clustered ? [.. cells, s.Replica] : cells;
            }));
        return Cli.Ok;
    }

    private static async Task<int> TopologyAsync(CommandContext c)
    {
        var devices = await c.Client.ListDevicesAsync(c.Stop);
        var groups = await c.Client.ListGroupsAsync(c.Stop);
        c.Output.Writer.Write(TopologyFile.Write(devices.Devices,
            $"Written by dmactl topology from {c.BrokerAddress} at revision {groups.Revision}: {devices.Devices.Count} devices, {groups.Groups.Count} groups (pinned). See docs/topology.md."));
        return Cli.Ok;
    }

    private static Task<int> VersionAsync(CommandContext c)
    {
        c.Output.Result($"dmactl {Cli.Version}", ("version", Cli.Version));
        return Task.FromResult(Cli.Ok);
    }

    private static Task<int> CompletionAsync(CommandContext c)
    {
        // System.CommandLine answers "dmactl [suggest:POSITION] 'COMMAND LINE'" with the completions, one a line.
        c.Output.Writer.Write("""
            # dmactl completion for bash: eval "$(dmactl completion bash)" in ~/.bashrc
            _dmactl_complete() {
                local IFS=$'\n'
                COMPREPLY=($(compgen -W "$(dmactl "[suggest:${COMP_POINT}]" "${COMP_LINE}" 2>/dev/null)" -- "${COMP_WORDS[COMP_CWORD]}"))
            }
            complete -o default -F _dmactl_complete dmactl

            """);
        return Task.FromResult(Cli.Ok);
    }

    private static int PrintDevice(CommandContext c, Device device)
    {
        if (c.Output.Json)
            c.Output.Message(device);
        else
            c.Output.Line($"{device.Address}: driver {(device.Driver.Length == 0 ? "none" : device.Driver)}, group {device.GroupId}");
        return Cli.Ok;
    }

    private static readonly string[] GroupHeader = ["GROUP", "OWNER", "COUNT", "SESSION", "GEN", "DOMAIN", "DEVICES"];

    private static Cell[] GroupRow(Group g) =>
    [
        Number(g.Id),
        new(Name(g.OwnerKind), g.OwnerKind switch { OwnerKind.User => new Style(Color.Green), OwnerKind.Kernel => new Style(Color.Yellow), _ => (Style?)null }),
        Number(g.OwnerCount),
        g.OwnerSession == 0 ? "-" : Number(g.OwnerSession),
        Number(g.Generation),
        new(Name(g.Domain), g.Domain switch { DomainKind.User => new Style(Color.Green), DomainKind.Blocking => new Style(Color.Red), _ => (Style?)null }),
        string.Join(",", g.Devices),
    ];

    private static Cell DriverCell(Device d) =>
        d.Driver.Length == 0 ? new("-", new Style(Color.Grey)) : new(d.Driver, d.Driver == "vfio-pci" ? new Style(Color.Green) : (Style?)null);

    private static string Owner(Group g) => g.OwnerKind == OwnerKind.User ? $"user (session {g.OwnerSession})" : Name(g.OwnerKind);

    /// <summary>An enum as --json writes it: <c>user</c>, <c>kernel</c>, <c>default</c>…</summary>
    private static string Name<T>(T value) where T : struct, Enum =>
        ProtoJson.EnumName(CommonReflection.Descriptor.EnumTypes.Single(e => e.ClrType == typeof(T)), Convert.ToInt32(value, CultureInfo.InvariantCulture));

    private static string Number<T>(T value) where T : IFormattable => value.ToString(null, CultureInfo.InvariantCulture);

    private static string Age(TimeSpan age) => age.TotalSeconds < 60
        ? string.Create(CultureInfo.InvariantCulture, $"{age.TotalSeconds:F1}s")
        : age.TotalHours < 1 ? string.Create(CultureInfo.InvariantCulture, $"{(int)age.TotalMinutes}m{age.Seconds:D2}s")
        : string.Create(CultureInfo.InvariantCulture, $"{(int)age.TotalHours}h{age.Minutes:D2}m");
}
