using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Ownership;

/// <summary>
/// A group's owner as this broker's table holds it, which a cluster store compares with what it
/// holds: nobody, <paramref name="Count"/> kernel DMA-API drivers, or a session's
/// <paramref name="Count"/> claims.
/// </summary>
/// <param name="Kind">NONE, KERNEL or USER.</param>
/// <param name="Count">SPEC §3's owner_cnt.</param>
/// <param name="Session">The owning session for USER, else 0.</param>
/// <param name="Replica">The replica that serves a USER owner of another replica; null for this replica's own session, or for NONE and KERNEL.</param>
public readonly record struct GroupOwner(OwnerKind Kind, int Count, ulong Session, string? Replica);

/// <summary>
/// Where a group's ownership is decided (SPEC §16): every claim, release, driver bind and hotplug
/// goes through it, under the group's lock (and the hotplug lock for hotplug), after the table has
/// checked the §3 rules and before it changes anything. A store that refuses throws an
/// <see cref="ErrnoException"/>, and the table then changes nothing. The default,
/// <see cref="EmbeddedOwnershipStore"/>, is the single process's table itself and refuses nothing;
/// a cluster store (etcd) makes each change a transaction shared by every replica.
/// </summary>
public interface IOwnershipStore
{
    /// <summary>The replica this broker is in a cluster, or null for a single process.</summary>
    string? Replica { get; }

    /// <summary>
    /// The first session id this broker may hand out: a cluster store gives each replica its own
    /// range, so a session id names one session across the cluster. 1 for a single process.
    /// </summary>
    ulong FirstSessionId { get; }

    /// <summary>
    /// A user claim of group <paramref name="groupId"/> by <paramref name="session"/>, which held
    /// <paramref name="countBefore"/> claims on it (0: the group is free and this is a new grant).
    /// Returns the grant's generation: a new one, greater than <paramref name="generation"/>, for a
    /// new grant; <paramref name="generation"/> itself otherwise. Throws to refuse.
    /// </summary>
    ulong CommitClaim(uint groupId, Session session, int countBefore, ulong generation);

    /// <summary>
    /// A user release: <paramref name="session"/>'s claims on the group go from
    /// <paramref name="countBefore"/> to <paramref name="countAfter"/> (0: the group is free).
    /// Never throws: a release always happens in the table, and a store that cannot record it
    /// must free the group no later than the session's end.
    /// </summary>
    void CommitRelease(uint groupId, Session session, int countBefore, int countAfter, ulong generation);

    /// <summary>
    /// A driver binds to a device of the group, or unbinds from it: <paramref name="device"/>'s driver
    /// goes from <paramref name="driverBefore"/> to <paramref name="driverAfter"/> (null: none), and
    /// the group's owner, <paramref name="owner"/> as the table holds it, gets
    /// <paramref name="kernelCountAfter"/> kernel DMA-API drivers (its count unchanged for a
    /// <c>driver_managed_dma</c> driver). Throws to refuse.
    /// </summary>
    void CommitDriver(uint groupId, GroupOwner owner, PciAddress device, string? driverBefore, string? driverAfter, int kernelCountAfter);

    /// <summary>
    /// A device is hot-added into group <paramref name="groupId"/> (<paramref name="added"/>: an
    /// existing group, or a new one with that id) or removed from it. <paramref name="owner"/> is the
    /// group's owner as the table holds it (NONE for a new group); <paramref name="driver"/> the
    /// device's driver (bound with the add, or bound until the removal); the group then has
    /// <paramref name="kernelCountAfter"/> kernel DMA-API drivers. Called under the hotplug lock and
    /// the group's (a new group's: the hotplug lock alone). Throws to refuse.
    /// </summary>
    void CommitHotplug(PciFunctionSpec device, uint groupId, GroupOwner owner, bool added, string? driver, int kernelCountAfter);

    /// <summary>A session has ended and released everything it held: the store forgets it.</summary>
    void SessionEnded(Session session);
}

/// <summary>
/// The single-process store: the table in this process is the whole truth, so it refuses nothing
/// and a new grant's generation is the next number. The default.
/// </summary>
public sealed class EmbeddedOwnershipStore : IOwnershipStore
{
    /// <summary>The one instance: it holds no state.</summary>
    public static EmbeddedOwnershipStore Instance { get; } = new();

    private EmbeddedOwnershipStore()
    {
    }

    /// <inheritdoc/>
    public string? Replica => null;

    /// <inheritdoc/>
    public ulong FirstSessionId => 1;

    /// <inheritdoc/>
    public ulong CommitClaim(uint groupId, Session session, int countBefore, ulong generation) =>
        countBefore == 0 ? generation + 1 : generation;

    /// <inheritdoc/>
    public void CommitRelease(uint groupId, Session session, int countBefore, int countAfter, ulong generation)
    {
    }

    /// <inheritdoc/>
    public void CommitDriver(uint groupId, GroupOwner owner, PciAddress device, string? driverBefore, string? driverAfter, int kernelCountAfter)
    {
    }

    /// <inheritdoc/>
    public void CommitHotplug(PciFunctionSpec device, uint groupId, GroupOwner owner, bool added, string? driver, int kernelCountAfter)
    {
    }

    /// <inheritdoc/>
    public void SessionEnded(Session session)
    {
    }
}
