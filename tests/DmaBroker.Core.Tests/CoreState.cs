using System.Globalization;
using System.Text;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Tests;

/// <summary>
/// Reads the core's whole ownership state for comparisons, and checks the SPEC §10 invariants
/// that are visible in it. Single-threaded callers only, except <see cref="CheckGroup"/>, which
/// the caller runs under the group's lock.
/// </summary>
internal static class CoreState
{
    private static readonly string[] DmaManagingDrivers = ["vfio-pci", "pci-stub", "pcieport"];

    /// <summary>Independent of <c>Drivers.ManagesDma</c>: SPEC §1's list, written out again.</summary>
    public static bool UsesDmaApi(string? driver) => driver is not null && !DmaManagingDrivers.Contains(driver);

    /// <summary>
    /// Every group, device and live container, one canonical line each. The reference model renders
    /// itself with the same line writers, so two states are equal exactly when their renderings are.
    /// </summary>
    public static string Render(Broker broker)
    {
        var sb = new StringBuilder(4096);
        var groups = broker.Table.Groups.ToArray();
        Array.Sort(groups, static (x, y) => x.Id.CompareTo(y.Id));
        foreach (var g in groups)
        {
            // The core keeps each group's devices in address order, as the model does.
            GroupLine(sb, g.Id, g.OwnerCount, g.Owner?.Id, g.Domain, g.Generation, g.Attached?.Id, broker.Vfio.ContainerSetOn(g)?.Id,
                g.Devices.Select(d => d.Address));
            foreach (var d in g.Devices)
                DeviceLine(sb, d.Address, g.Id, d.Driver, d.BoundBy?.Id, broker.Vfio.BoundContainerOf(d)?.Id, d.OpenHandles);
        }
        var live = broker.Sessions.Live.ToArray();
        Array.Sort(live, static (x, y) => x.Id.CompareTo(y.Id));
        var containers = live.SelectMany(broker.Vfio.ContainersOf).ToArray();
        Array.Sort(containers, static (x, y) => x.Id.CompareTo(y.Id));
        foreach (var c in containers)
        {
            var (held, devices) = c.Holdings();
            ContainerLine(sb, c.Id, c.Owner.Id, held.Select(g => g.Id).Order(), devices.Select(d => d.Address).Order());
        }
        foreach (var s in live)
            SessionLine(sb, s.Id);
        return sb.ToString();
    }

    public static void GroupLine(StringBuilder sb, uint id, int count, ulong? owner, DomainKind domain, ulong generation,
        ulong? attached, ulong? containerSet, IEnumerable<PciAddress> devices)
    {
        sb.Append("group ").Append(id).Append(": cnt=").Append(count).Append(" owner=");
        Id(sb, owner, 's').Append(" domain=").Append(domain switch
        {
            DomainKind.Default => "DEFAULT",
            DomainKind.Blocking => "BLOCKING",
            DomainKind.User => "USER",
            _ => "?",
        }).Append(" gen=").Append(generation).Append(" attached=");
        Id(sb, attached, 'c').Append(" set=");
        Id(sb, containerSet, 'c').Append(" devices=[");
        List(sb, devices).Append("]\n");
    }

    public static void DeviceLine(StringBuilder sb, PciAddress address, uint group, string? driver, ulong? boundBy, ulong? boundContainer, int openHandles)
    {
        sb.Append("  device ").Append(Text(address)).Append(": group=").Append(group)
            .Append(" driver=").Append(driver ?? "-").Append(" boundBy=");
        Id(sb, boundBy, 's').Append(" into=");
        Id(sb, boundContainer, 'c').Append(" open=").Append(openHandles).Append('\n');
    }

    public static void ContainerLine<T>(StringBuilder sb, ulong id, ulong owner, IEnumerable<uint> groups, IEnumerable<T> devices)
    {
        sb.Append("container c").Append(id).Append(": owner=s").Append(owner).Append(" groups=[");
        List(sb, groups).Append("] devices=[");
        List(sb, devices).Append("]\n");
    }

    public static void SessionLine(StringBuilder sb, ulong id) => sb.Append("session s").Append(id).Append(" live\n");

    private static StringBuilder Id(StringBuilder sb, ulong? id, char prefix) =>
        id is { } v ? sb.Append(prefix).Append(v) : sb.Append('-');

    private static StringBuilder List<T>(StringBuilder sb, IEnumerable<T> items)
    {
        var first = true;
        foreach (var item in items)
        {
            if (!first)
                sb.Append(',');
            if (item is PciAddress address)
                sb.Append(Text(address));
            else
                sb.Append(item);
            first = false;
        }
        return sb;
    }

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<PciAddress, string> AddressTexts = new();

    private static string Text(PciAddress address) => AddressTexts.GetOrAdd(address, static a => a.ToString());

    /// <summary>
    /// SPEC §10 invariants 1, 2 and 6 over the whole table, plus the journal agreeing with the live
    /// state (every change was published). Returns the violations, empty when all hold.
    /// </summary>
    public static List<string> Violations(Broker broker)
    {
        var problems = new List<string>();
        var live = broker.Sessions.Live.ToHashSet();
        foreach (var g in broker.Table.Groups)
            CheckGroup(broker.Vfio, g, live, problems);
        CheckJournal(broker, problems);
        return problems;
    }

    /// <summary>One group's invariants; call under <c>group.Sync</c> when other threads run.</summary>
    public static void CheckGroup(Vfio.VfioDriver vfio, IommuGroup g, IReadOnlySet<Sessions.Session>? liveSessions, List<string> problems)
    {
        var dmaApi = g.Devices.Count(d => UsesDmaApi(d.Driver));
        var userClaims = (vfio.ContainerSetOn(g) is null ? 0 : 1) + g.Devices.Count(d => d.BoundBy is not null);
        if (g.OwnerCount < 0)
            problems.Add($"{Where(g)}: negative owner count");
        if (g.Owner is null)
        {
            // Invariant 1: without a user owner, the count is exactly the kernel's.
            if (g.OwnerCount != dmaApi)
                problems.Add($"{Where(g)}: kernel-owned count {g.OwnerCount} but {dmaApi} DMA-API driver(s) bound");
            if (userClaims > 0 || g.Attached is not null)
                problems.Add($"{Where(g)}: user claims or an attached container without a user owner");
            if (g.Domain != DomainKind.Default)
                problems.Add($"{Where(g)}: not user-owned but not in the default domain");
        }
        else
        {
            // Invariant 2: no DMA-API driver in a user-owned group; invariant 1: the count is all the user's.
            if (dmaApi > 0)
                problems.Add($"{Where(g)}: user-owned with {dmaApi} DMA-API driver(s) bound");
            if (g.OwnerCount != userClaims || g.OwnerCount == 0)
                problems.Add($"{Where(g)}: user-owned count {g.OwnerCount} but {userClaims} user claim(s)");
            if (vfio.ContainerSetOn(g) is { } set && set.Owner != g.Owner)
                problems.Add($"{Where(g)}: container c{set.Id} of session {set.Owner.Id} set on it");
            if (g.Devices.FirstOrDefault(d => d.BoundBy is not null && d.BoundBy != g.Owner) is { } other)
                problems.Add($"{Where(g)}: {other.Address} bound by another session {other.BoundBy!.Id}");
            if (g.Domain == DomainKind.Default)
                problems.Add($"{Where(g)}: user-owned in the default domain");
            if (liveSessions is not null && !liveSessions.Contains(g.Owner))
                problems.Add($"{Where(g)}: owned by session {g.Owner.Id}, which has ended");
            if (g.Attached is Vfio.Container { Destroyed: true } destroyed)
                problems.Add($"{Where(g)}: destroyed container c{destroyed.Id} attached");
        }
        if ((g.Domain == DomainKind.User) != (g.Attached is not null))
            problems.Add($"{Where(g)}: domain and attached container c{g.Attached?.Id} disagree");
    }

    private static string Where(IommuGroup g) => $"group {g.Id} (cnt={g.OwnerCount}, owner={g.Owner?.Id}, domain={g.Domain})";

    private static void CheckJournal(Broker broker, List<string> problems)
    {
        var snapshot = broker.Journal.Current;
        var count = 0;
        foreach (var g in broker.Table.Groups)
        {
            count++;
            if (!snapshot.Groups.TryGetValue(g.Id, out var published))
            {
                problems.Add($"journal lacks group {g.Id}");
                continue;
            }
            if (published.OwnerKind != g.OwnerKind || published.OwnerCount != g.OwnerCount || published.OwnerSession != (g.Owner?.Id ?? 0)
                || published.Generation != g.Generation || published.Domain != g.Domain
                || !published.Devices.SequenceEqual(g.Devices.Select(d => d.Address)))
            {
                problems.Add($"journal says {Describe(published)}, the table {Describe(g.ToInfo())}");
            }
            foreach (var d in g.Devices)
            {
                if (!snapshot.Devices.TryGetValue(d.Address, out var info) || info.Driver != d.Driver || info.GroupId != g.Id
                    || info.DriverManagedDma != d.DriverManagesDma)
                {
                    problems.Add($"journal's device {d.Address} is {info}, the table's {d.ToInfo()}");
                }
            }
        }
        if (snapshot.Groups.Count != count)
            problems.Add($"journal lists {snapshot.Groups.Count} groups, the table {count}");
    }

    public static string Describe(GroupInfo g) =>
        string.Create(CultureInfo.InvariantCulture,
            $"group {g.Id} {g.OwnerKind}({g.OwnerCount}) session={g.OwnerSession} gen={g.Generation} {g.Domain} [{string.Join(',', g.Devices)}]");

    /// <summary>Formats a violations list for an assertion message.</summary>
    public static string Format(IEnumerable<string> problems)
    {
        var sb = new StringBuilder();
        foreach (var p in problems)
            sb.Append("  - ").AppendLine(p);
        return sb.ToString();
    }

    /// <summary>Asserts every invariant holds.</summary>
    public static void AssertInvariants(Broker broker)
    {
        var problems = Violations(broker);
        Assert.True(problems.Count == 0, "SPEC §10 invariants violated:\n" + Format(problems));
    }

    /// <summary>Runs <paramref name="call"/> and returns the errno it failed with, or null on success.</summary>
    public static Errno? ErrnoOf(Action call)
    {
        try
        {
            call();
            return null;
        }
        catch (ErrnoException e)
        {
            return e.Errno;
        }
    }

    /// <summary>Asserts the call fails with <paramref name="errno"/> and leaves the whole state and journal untouched.</summary>
    public static ErrnoException AssertRejected(Broker broker, Errno errno, Action call)
    {
        var before = Render(broker);
        var revision = broker.Journal.Current.Revision;
        var e = Assert.Throws<ErrnoException>(call);
        Assert.Equal(errno, e.Errno);
        Assert.Equal(before, Render(broker));
        Assert.Equal(revision, broker.Journal.Current.Revision);
        return e;
    }

    /// <summary>The current published view of one group.</summary>
    public static GroupInfo Group(Broker broker, uint id) => broker.Journal.Current.Groups[id];

    /// <summary>The awaits in tests carry a timeout: a hang fails, it does not stall the run.</summary>
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    public static PciAddress Addr(string text) => PciAddress.Parse(text);

    /// <summary>Builds a topology from JSON text, as a topology file would be read.</summary>
    public static TopologyDocument ParseTopology(string json, string source = "test topology")
    {
        using var stream = new MemoryStream(Encoding.UTF8.GetBytes(json));
        return TopologyDocument.Parse(stream, source);
    }
}
