using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Ctl;

internal sealed record CommandContext(BrokerClient Client, Output Output, string[] Args, TextWriter Error, CancellationToken Stop)
{
    public string Arg(int index, string name) =>
        index < Args.Length && !Args[index].StartsWith("--", StringComparison.Ordinal) ? Args[index] : throw new UsageException($"missing <{name}>");

    public uint GroupId(int index)
    {
        var text = Arg(index, "group");
        return uint.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var id)
            ? id
            : throw new UsageException($"<group> must be a group number such as 14, got '{text}'");
    }

    public bool Flag(string name) => Args.Contains(name);

    /// <summary>An integer option <c>--name N</c> within [min, max], or its default.</summary>
    public int Int(string name, int fallback, int min, int max)
    {
        var i = Array.IndexOf(Args, name);
        if (i < 0)
            return fallback;
        if (i + 1 >= Args.Length || !int.TryParse(Args[i + 1], NumberStyles.None, CultureInfo.InvariantCulture, out var value) || value < min || value > max)
            throw new UsageException($"{name} takes a number from {min} to {max}");
        return value;
    }
}

internal sealed record Command(string Name, string Usage, string Summary, Func<CommandContext, Task<int>> RunAsync);

/// <summary>Every dmactl command.</summary>
internal static class Commands
{
    private static readonly Command[] All =
    [
        new("devices", "devices", "List PCI devices: address, ids, model, group and driver.", DevicesAsync),
        new("groups", "groups", "List IOMMU groups: owner kind, owner count, owning session, generation, domain, devices.", GroupsAsync),
        new("group", "group <id>", "Show one IOMMU group.", GroupAsync),
        new("watch", "watch", "Print a snapshot, then every group and device change as it happens, until Ctrl-C.", WatchAsync),
        new("hold", "hold <group> [--iommufd]", "Open a session, claim the group with SetContainer, and hold it until Ctrl-C; the broker releases it when dmactl exits, however it exits.", HoldAsync),
        new("bind", "bind <address> <driver>", "Bind a driver to a device, as the kernel would (vfio-pci, pci-stub and pcieport manage DMA themselves; others use the DMA API).", BindAsync),
        new("unbind", "unbind <address>", "Unbind a device's driver.", UnbindAsync),
        new("revoke", "revoke <session> [reason]", "End a session; the broker tells it why and releases everything it held.", RevokeAsync),
        new("sessions", "sessions", "List live sessions, oldest first: id, principal, client name, peer, age, groups held, memory and DMA streams. Viewers and admins see all; a user sees its own.", SessionsAsync),
        new("stats", "stats", "Live sessions, containers, user-owned groups and watchers.", StatsAsync),
        new("dma", "dma <address> [--bytes N]", "Claim the device's group, map memory, and run a DMA round trip: the device writes a pattern, the CPU checks it, the device reads it back.", DeviceCommands.DmaAsync),
        new("bench", "bench <address> [--size BYTES] [--seconds N] [--window N]", "Claim the device's group and measure DMA write throughput, with a live progress line.", DeviceCommands.BenchAsync),
    ];

    public static Command? Find(string name) => All.FirstOrDefault(c => c.Name == name);

    private static async Task<int> DevicesAsync(CommandContext c)
    {
        var response = await c.Client.ListDevicesAsync(c.Stop);
        if (c.Output.Json)
        {
            c.Output.Message(response);
            return Cli.Ok;
        }
        c.Output.Table(["ADDRESS", "ID", "CLASS", "MODEL", "GROUP", "DRIVER"],
            response.Devices.Select(d => new[]
            {
                d.Address, $"{Output.Hex(d.VendorId, 4)}:{Output.Hex(d.DeviceId, 4)}", Output.Hex(d.ClassCode, 6), d.Model,
                d.GroupId.ToString(CultureInfo.InvariantCulture), d.Driver.Length == 0 ? "-" : d.Driver,
            }));
        return Cli.Ok;
    }

    private static async Task<int> GroupsAsync(CommandContext c)
    {
        var response = await c.Client.ListGroupsAsync(c.Stop);
        if (c.Output.Json)
        {
            c.Output.Message(response);
            return Cli.Ok;
        }
        c.Output.Table(["GROUP", "OWNER", "COUNT", "SESSION", "GEN", "DOMAIN", "DEVICES"], response.Groups.Select(GroupRow));
        return Cli.Ok;
    }

    private static async Task<int> GroupAsync(CommandContext c)
    {
        var group = await c.Client.GetGroupAsync(c.GroupId(0), c.Stop);
        if (c.Output.Json)
            c.Output.Message(group);
        else
            c.Output.Table(["GROUP", "OWNER", "COUNT", "SESSION", "GEN", "DOMAIN", "DEVICES"], [GroupRow(group)]);
        return Cli.Ok;
    }

    private static async Task<int> WatchAsync(CommandContext c)
    {
        await foreach (var ev in c.Client.WatchAsync(c.Stop))
        {
            if (c.Output.Json)
            {
                c.Output.Message(ev);
                continue;
            }
            c.Output.Line(ev.EventCase switch
            {
                WatchEvent.EventOneofCase.Snapshot => $"rev {ev.Revision}  snapshot: {ev.Snapshot.Groups.Count} groups, {ev.Snapshot.Devices.Count} devices, {ev.Snapshot.Groups.Count(g => g.OwnerKind == OwnerKind.User)} user-owned",
                WatchEvent.EventOneofCase.Group => $"rev {ev.Revision}  group {ev.Group.Id}: {Owner(ev.Group)}, count {ev.Group.OwnerCount}, generation {ev.Group.Generation}, domain {Domain(ev.Group.Domain)}",
                WatchEvent.EventOneofCase.Device => $"rev {ev.Revision}  device {ev.Device.Address}: driver {(ev.Device.Driver.Length == 0 ? "none" : ev.Device.Driver)}, group {ev.Device.GroupId}",
                WatchEvent.EventOneofCase.DeviceRemoved => $"rev {ev.Revision}  device {ev.DeviceRemoved.Address} removed",
                WatchEvent.EventOneofCase.GroupRemoved => $"rev {ev.Revision}  group {ev.GroupRemoved.GroupId} removed",
                WatchEvent.EventOneofCase.SessionEnded => $"rev {ev.Revision}  session {ev.SessionEnded.SessionId} ended ({ev.SessionEnded.Reason}); all it held is released",
                _ => $"rev {ev.Revision}  (unknown event)",
            });
        }
        return Cli.Ok;
    }

    private static async Task<int> HoldAsync(CommandContext c)
    {
        var groupId = c.GroupId(0);
        var type = c.Flag("--iommufd") ? ContainerType.Iommufd : ContainerType.Type1V2;
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
            await c.Error.WriteLineAsync($"dmactl: session {session.Id} ended: {await session.Ended}");
            return Cli.Rejected;
        }
        if (!c.Output.Json)
            c.Output.Line($"released group {groupId}");
        return Cli.Ok;
    }

    private static async Task<int> BindAsync(CommandContext c)
    {
        var device = await c.Client.Admin.BindDriverAsync(c.Arg(0, "address"), c.Arg(1, "driver"), c.Stop);
        return PrintDevice(c, device);
    }

    private static async Task<int> UnbindAsync(CommandContext c)
    {
        var device = await c.Client.Admin.UnbindDriverAsync(c.Arg(0, "address"), c.Stop);
        return PrintDevice(c, device);
    }

    private static async Task<int> RevokeAsync(CommandContext c)
    {
        var text = c.Arg(0, "session");
        if (!ulong.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var id))
            throw new UsageException($"<session> must be a session id such as 3, got '{text}'");
        var reason = c.Args.Length > 1 ? string.Join(' ', c.Args.Skip(1)) : "";
        await c.Client.Admin.RevokeSessionAsync(id, reason, c.Stop);
        if (!c.Output.Json)
            c.Output.Line($"revoked session {id}; everything it held is released");
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
                    stats.MemoryBytes, stats.OpenDevices, stats.DmaStreams, stats.Mappings }
                    .Select(v => v.ToString(CultureInfo.InvariantCulture))]]);
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
        c.Output.Table(["SESSION", "PRINCIPAL", "CLIENT", "PEER", "AGE", "GROUPS", "MEMORY", "STREAMS"],
            sessions.Select(s => new[]
            {
                s.SessionId.ToString(CultureInfo.InvariantCulture), s.Principal, s.ClientName, s.Peer,
                Age(TimeSpan.FromMilliseconds(s.AgeMs)),
                s.Groups.Count == 0 ? "-" : string.Join(",", s.Groups),
                s.MemoryBytes.ToString(CultureInfo.InvariantCulture),
                s.DmaStreams.ToString(CultureInfo.InvariantCulture),
            }));
        return Cli.Ok;
    }

    private static string Age(TimeSpan age) => age.TotalSeconds < 60
        ? string.Create(CultureInfo.InvariantCulture, $"{age.TotalSeconds:F1}s")
        : age.TotalHours < 1 ? string.Create(CultureInfo.InvariantCulture, $"{(int)age.TotalMinutes}m{age.Seconds:D2}s")
        : string.Create(CultureInfo.InvariantCulture, $"{(int)age.TotalHours}h{age.Minutes:D2}m");

    private static int PrintDevice(CommandContext c, Device device)
    {
        if (c.Output.Json)
            c.Output.Message(device);
        else
            c.Output.Line($"{device.Address}: driver {(device.Driver.Length == 0 ? "none" : device.Driver)}, group {device.GroupId}");
        return Cli.Ok;
    }


    private static string[] GroupRow(Group g) =>
    [
        g.Id.ToString(CultureInfo.InvariantCulture),
        g.OwnerKind switch { OwnerKind.Kernel => "kernel", OwnerKind.User => "user", _ => "none" },
        g.OwnerCount.ToString(CultureInfo.InvariantCulture),
        g.OwnerSession == 0 ? "-" : g.OwnerSession.ToString(CultureInfo.InvariantCulture),
        g.Generation.ToString(CultureInfo.InvariantCulture),
        Domain(g.Domain),
        string.Join(",", g.Devices),
    ];

    private static string Owner(Group g) => g.OwnerKind switch
    {
        OwnerKind.Kernel => "kernel",
        OwnerKind.User => $"user (session {g.OwnerSession})",
        _ => "none",
    };

    private static string Domain(DomainKind d) => d switch
    {
        DomainKind.Blocking => "blocking",
        DomainKind.User => "user",
        _ => "default",
    };
}
