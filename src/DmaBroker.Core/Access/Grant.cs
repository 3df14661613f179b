using System.Collections.Frozen;

namespace DmaBroker.Core.Access;

/// <summary>What a principal may call (SPEC §12). Each role includes the ones below it.</summary>
public enum Role
{
    /// <summary>Topology.*, Kernel.GetStats, Kernel.ListSessions and health.</summary>
    Viewer = 1,
    /// <summary>The viewer's calls, Session.Open and, with its own session token, Vfio.*, Memory.*, Dma.*.</summary>
    User = 2,
    /// <summary>Everything, including Kernel.* and acting on any session.</summary>
    Admin = 3,
}

/// <summary>
/// A principal's limits (SPEC §12). Sessions and the open rate count per principal; memory,
/// containers and DMA streams per session; mappings per container.
/// </summary>
public sealed record Quotas
{
    /// <summary>The defaults SPEC §12 gives for keys the auth file leaves out.</summary>
    public static Quotas Default { get; } = new();

    /// <summary>Live sessions at once; one more is EMFILE (a session is a file).</summary>
    public int Sessions { get; init; } = 16;

    /// <summary>Memory one session may allocate, in bytes; beyond it, ENOMEM.</summary>
    public ulong MemoryBytes { get; init; } = 256UL << 20;

    /// <summary>Containers one session may hold; one more is ENOSPC.</summary>
    public int Containers { get; init; } = 64;

    /// <summary>Mappings per container (dma_avail); one more is ENOSPC.</summary>
    public int Mappings { get; init; } = 65535;

    /// <summary>DMA streams one session may have open; one more is ENOSPC.</summary>
    public int DmaStreams { get; init; } = 16;

    /// <summary>Session.Open calls per second (a token bucket this deep); faster is EAGAIN.</summary>
    public int OpensPerSecond { get; init; } = 20;

    /// <summary>
    /// Open mode's limits: nothing per principal (every caller is one principal, <c>anonymous</c>),
    /// only the per-session memory and per-container mapping limits the broker was started with.
    /// </summary>
    public static Quotas Unlimited(ulong memoryBytes, int mappings) => new()
    {
        Sessions = int.MaxValue,
        MemoryBytes = memoryBytes,
        Containers = int.MaxValue,
        Mappings = mappings,
        DmaStreams = int.MaxValue,
        OpensPerSecond = int.MaxValue,
    };
}

/// <summary>
/// The groups a principal may claim: listed ids, or groups every device of which matches one of
/// the address globs (SPEC §12). <see cref="All"/> when the auth file says nothing.
/// </summary>
public sealed class GroupPolicy
{
    private readonly FrozenSet<uint> _ids;
    private readonly string[] _globs;

    /// <summary>A policy of group ids and device address globs such as <c>0000:0[89]:*</c>.</summary>
    public GroupPolicy(IEnumerable<uint> ids, IEnumerable<string> globs)
    {
        _ids = ids.ToFrozenSet();
        _globs = [.. globs];
    }

    private GroupPolicy()
    {
        _ids = FrozenSet<uint>.Empty;
        _globs = [];
        AllowsAll = true;
    }

    /// <summary>Every group: the auth file gave no <c>groups</c>.</summary>
    public static GroupPolicy All { get; } = new();

    /// <summary>True when no list restricts the principal.</summary>
    public bool AllowsAll { get; }

    /// <summary>Whether a group with this id and these devices may be claimed.</summary>
    public bool Allows(uint groupId, IReadOnlyCollection<PciAddress> devices)
    {
        if (AllowsAll || _ids.Contains(groupId))
            return true;
        if (_globs.Length == 0 || devices.Count == 0)
            return false;
        return devices.All(device =>
        {
            var address = device.ToString();
            return _globs.Any(glob => Glob.MatchFull(glob, address));
        });
    }

    /// <summary>The policy as the auth file wrote it, for messages and ListSessions.</summary>
    public override string ToString() =>
        AllowsAll ? "all groups" : string.Join(", ", _ids.Order().Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture)).Concat(_globs));
}

/// <summary>
/// What one principal may do, resolved from the auth file's first matching entry: its role (none
/// when the entry lists no role), the groups it may claim, and its quotas.
/// </summary>
public sealed record Grant(string Principal, Role? Role, GroupPolicy Groups, Quotas Quotas)
{
    /// <summary>True when the principal's role includes <paramref name="needed"/>.</summary>
    public bool Permits(Role needed) => Role >= needed;
}
