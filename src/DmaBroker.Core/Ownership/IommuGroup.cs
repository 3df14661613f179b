using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Ownership;

/// <summary>A session of another replica that owns a group (SPEC §16).</summary>
/// <param name="SessionId">The session's id, unique across the cluster.</param>
/// <param name="Replica">The replica that serves it.</param>
public sealed record RemoteOwner(ulong SessionId, string Replica);

/// <summary>
/// An IOMMU group and its DMA ownership state machine, after Linux <c>drivers/iommu/iommu.c</c>
/// (v5.19+). Every member is guarded by <see cref="Sync"/>, the kernel's <c>group-&gt;mutex</c>;
/// the <c>Check*</c> methods throw without changing anything, so a caller checks everything a
/// compound operation needs before it mutates.
/// </summary>
public sealed class IommuGroup(uint id, IOwnershipStore? store = null)
{
    /// <summary>The group's lock (lock 2 of <c>docs/locking.md</c>): below the hotplug lock, above every other.</summary>
    internal readonly Lock Sync = new();

    /// <summary>The group's number, stable across restarts for one topology (SPEC §2).</summary>
    public uint Id { get; } = id;

    internal List<PciDevice> Devices { get; } = [];
    internal int OwnerCount { get; set; }
    internal Session? Owner { get; set; }
    /// <summary>
    /// A session of another replica that owns the group (SPEC §16), as the cluster store last
    /// reported it; then <see cref="Owner"/> is null and the count is that session's claims.
    /// </summary>
    internal RemoteOwner? Remote { get; set; }
    /// <summary>Where the group's ownership changes are decided: this process, or the cluster.</summary>
    internal IOwnershipStore Store { get; } = store ?? EmbeddedOwnershipStore.Instance;
    internal DomainKind Domain { get; set; } = DomainKind.Default;
    internal ulong Generation { get; set; }
    /// <summary>
    /// The user domain attached (Domain == User): a container's address space. Assign it to
    /// attach; detach only with <see cref="DetachAndDrain"/>, which waits out the DMA still
    /// translating through it. Device accesses read it without the group's lock.
    /// </summary>
    internal IUserDomain? Attached
    {
        get => Volatile.Read(ref _attached);
        set => Volatile.Write(ref _attached, value);
    }

    private IUserDomain? _attached;
    internal bool Removed { get; set; }

    /// <summary>The owner as a cluster store compares it (SPEC §16).</summary>
    internal GroupOwner OwnerState => new(OwnerKind, OwnerCount, Owner?.Id ?? Remote?.SessionId ?? 0, Remote?.Replica);

    internal OwnerKind OwnerKind => OwnerCount == 0 ? OwnerKind.None : Owner is null && Remote is null ? OwnerKind.Kernel : OwnerKind.User;

    // --- kernel DMA API (iommu_device_use_default_domain / unuse) ---

    internal void CheckKernelUse(PciDevice device, string driver)
    {
        if (OwnerCount > 0 && (OwnerKind == OwnerKind.User || Domain != DomainKind.Default))
            throw ErrnoException.Busy($"cannot bind DMA-API driver {driver} to {device.Address}: group {Id} is {Describe()}");
    }

    internal void KernelUse() => OwnerCount++;

    internal void CheckKernelUnuse()
    {
        if (OwnerKind != OwnerKind.Kernel)
            throw ErrnoException.Conflict(Errno.EINVAL, $"group {Id} holds no kernel DMA ownership");
    }

    internal void KernelUnuse()
    {
        CheckKernelUnuse();
        OwnerCount--;
    }

    // --- user ownership (iommu_group_claim_dma_owner / iommu_device_claim_dma_owner) ---

    internal void CheckGroupClaim()
    {
        if (OwnerCount > 0)
            throw ErrnoException.NotPermitted($"group {Id} is {Describe()}");
        CheckDefaultDomain();
    }

    internal void CheckDeviceClaim(Session session)
    {
        if (OwnerCount > 0)
        {
            if (Owner != session)
                throw ErrnoException.NotPermitted($"group {Id} is {Describe()}");
            return;
        }
        CheckDefaultDomain();
    }

    private void CheckDefaultDomain()
    {
        if (Domain != DomainKind.Default)
            throw ErrnoException.Busy($"group {Id} is not in its default domain ({Domain})");
    }

    internal void ClaimGroup(Session session)
    {
        CheckGroupClaim();
        TakeOwnership(session);
    }

    internal void ClaimDevice(Session session)
    {
        CheckDeviceClaim(session);
        if (OwnerCount > 0)
        {
            Store.CommitClaim(Id, session, OwnerCount, Generation);
            OwnerCount++;
        }
        else
        {
            TakeOwnership(session);
        }
    }

    private void TakeOwnership(Session session)
    {
        Generation = Store.CommitClaim(Id, session, 0, Generation);
        Owner = session;
        OwnerCount = 1;
        Domain = DomainKind.Blocking;
    }

    internal void CheckUserRelease(Session session)
    {
        if (OwnerCount == 0 || Owner != session)
            throw ErrnoException.Conflict(Errno.EINVAL, $"group {Id} is not owned by session {session.Id}");
    }

    /// <summary>iommu_group_release_dma_owner: back to the default domain, whatever the count.</summary>
    internal void ReleaseGroup(Session session)
    {
        CheckUserRelease(session);
        Store.CommitRelease(Id, session, OwnerCount, 0, Generation);
        OwnerCount = 0;
        Owner = null;
        DetachAndDrain();
        Domain = DomainKind.Default;
    }

    /// <summary>iommu_device_release_dma_owner: one claim less; the last one releases the group.</summary>
    internal void ReleaseDevice(Session session)
    {
        CheckUserRelease(session);
        if (OwnerCount > 1)
        {
            Store.CommitRelease(Id, session, OwnerCount, OwnerCount - 1, Generation);
            OwnerCount--;
        }
        else
            ReleaseGroup(session);
    }

    // --- user domains ---

    internal void CheckAttach(IUserDomain domain)
    {
        if (OwnerKind != OwnerKind.User)
            throw ErrnoException.Conflict(Errno.EINVAL, $"group {Id} is not user-owned");
        if (Domain == DomainKind.User && Attached != domain)
            throw ErrnoException.Busy($"group {Id} already has container {Attached?.Id}'s domain attached");
    }

    internal void AttachUserDomain(IUserDomain domain)
    {
        CheckAttach(domain);
        Attached = domain;
        Domain = DomainKind.User;
    }

    /// <summary>Detaching never returns straight to DEFAULT while the group is owned.</summary>
    internal void DetachUserDomain()
    {
        if (Domain != DomainKind.User)
            throw ErrnoException.Conflict(Errno.EINVAL, $"group {Id} has no user domain attached");
        DetachAndDrain();
        Domain = OwnerKind == OwnerKind.User ? DomainKind.Blocking : DomainKind.Default;
    }

    /// <summary>
    /// Detaches the user domain, if any, and returns only once no device access can still be
    /// translating through it. Every device access runs under its device model's lock and reads
    /// <see cref="Attached"/> there; so once the attachment is cleared, taking each device's model
    /// lock in turn waits out the access in flight, and every later one sees no domain. So none of
    /// its DMA lands afterwards; accesses of other groups through the same domain do not hold it up.
    /// </summary>
    internal void DetachAndDrain()
    {
        if (_attached is null)
            return;
        Interlocked.Exchange(ref _attached, null);
        foreach (var device in Devices)
        {
            lock (device.Model.Sync)
            {
                // Nothing to do: the lock is free only between two accesses of the device.
            }
        }
    }

    internal string Describe() => OwnerKind switch
    {
        OwnerKind.None => "unowned",
        OwnerKind.Kernel => $"owned by {OwnerCount} kernel DMA-API driver(s)",
        _ when Remote is { } remote => $"owned by session {remote.SessionId} on replica {remote.Replica}",
        _ => $"owned by session {Owner!.Id}",
    };

    /// <summary>
    /// Takes the cluster store's word for a group no session of this replica owns: owned by
    /// <paramref name="owner"/> with <paramref name="count"/> claims and <paramref name="generation"/>,
    /// by <paramref name="count"/> kernel DMA-API drivers (null owner, count above 0), or free (null,
    /// 0). Call under the group's lock; false, changing nothing, when a session of this replica owns
    /// it (then that session has lost its lease and must be fenced). A grant to another replica's
    /// session resets this replica's copies of the group's devices (SPEC §10.5, §16): whoever owns the
    /// group here next finds them reset, whatever they held before.
    /// </summary>
    internal bool ApplyRemote(RemoteOwner? owner, int count, ulong generation)
    {
        if (Owner is not null)
            return false;
        if (owner is not null && owner.SessionId != Remote?.SessionId)
        {
            foreach (var device in Devices)
            {
                lock (device.Model.Sync)
                    device.Model.Reset();
            }
        }
        Remote = owner;
        OwnerCount = count;
        Domain = owner is null ? DomainKind.Default : DomainKind.Blocking;
        Generation = Math.Max(Generation, generation);
        return true;
    }

    internal GroupInfo ToInfo() => new(
        Id,
        [.. Devices.Select(d => d.Address)],
        OwnerKind,
        OwnerCount,
        Owner?.Id ?? Remote?.SessionId ?? 0,
        Generation,
        Domain);
}
