using System.Collections.Concurrent;
using DmaBroker.Core.Faults;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Telemetry;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Vfio;

/// <summary>VFIO_IOMMU_GET_INFO: page sizes (a bitmap), usable IOVA ranges (inclusive) and mappings left.</summary>
/// <param name="PageSizes">The supported page sizes as a bitmap (here only 4096).</param>
/// <param name="IovaRanges">The IOVA ranges a mapping may use: the aperture minus the reserved MSI window.</param>
/// <param name="DmaAvailable">How many more mappings the container takes (dma_avail).</param>
public sealed record IommuInfo(ulong PageSizes, IReadOnlyList<(ulong First, ulong Last)> IovaRanges, int DmaAvailable);

/// <summary>What VFIO_GROUP_GET_STATUS reports to one session.</summary>
/// <param name="Viable">The group can be used: unowned, or this session's container is set on it.</param>
/// <param name="ContainerSet">This session's container is set on the group.</param>
public readonly record struct GroupStatus(bool Viable, bool ContainerSet);

/// <summary>
/// The user side of VFIO and iommufd (SPEC §4): containers, the group flow
/// (SetContainer/UnsetContainer, a group claim) and the device flow (BindDevice/UnbindDevice,
/// a device claim). Each call runs inside the session's operation scope and checks everything
/// before it changes anything, so a rejected call leaves no trace but in the claim counts of
/// <paramref name="metrics"/>.
/// </summary>
public sealed class VfioDriver(OwnershipTable table, BrokerMetrics metrics, int dmaLimit = 65535, Devices.DeviceEngines? engines = null)
{
    private readonly ConcurrentDictionary<Session, SessionFiles> _files = new();
    // VFIO's own side of a claim, kept here and not in the group or device, as Linux keeps it in
    // struct vfio_group and the vfio_device rather than in struct iommu_group: the container set on
    // a group (SetContainer), the container a device is bound into (BindDevice). Changed only
    // under the group's lock.
    private readonly ConcurrentDictionary<IommuGroup, Container> _containerSet = new();
    private readonly ConcurrentDictionary<PciDevice, Container> _boundInto = new();
    private long _nextHandleId;
    private long _nextContainerId;
    private int _liveContainers;

    /// <summary>Containers created and not yet destroyed, across every session.</summary>
    public int LiveContainers => Volatile.Read(ref _liveContainers);

    /// <summary>Device handles open in every session.</summary>
    public int OpenDevices => _files.Values.Sum(f => f.Handles.Snapshot().Length);

    /// <summary>IOVA mappings in every session's containers.</summary>
    public int Mappings => _files.Values.Sum(f => f.Containers.Snapshot().Sum(c => c.Iova.Count));

    /// <summary>
    /// VFIO_GROUP_GET_STATUS: viable when the group is unowned or this session's container is set
    /// on it; container_set only for this session's own container.
    /// </summary>
    public GroupStatus GetGroupStatus(Session session, uint groupId)
    {
        using var op = session.Enter();
        var group = table.GetGroup(groupId);
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(group);
            var mine = ContainerSetOn(group)?.Owner == session;
            return new GroupStatus(group.OwnerCount == 0 || mine, mine);
        }
    }

    /// <summary>Opens a container (or an IOAS) for the session, as opening /dev/vfio/vfio or /dev/iommu would.</summary>
    public Container CreateContainer(Session session, ContainerType type)
    {
        using var op = session.Enter();
        var quotas = session.Grant.Quotas;
        var files = FilesOf(session);
        // Counted and added under the session's lock, so racing creates cannot pass the quota together.
        lock (session.Sync)
        {
            if (files.Containers.Count >= quotas.Containers)
                throw ErrnoException.Exhausted(Errno.ENOSPC, $"session {session.Id} holds {quotas.Containers} container(s), its principal's quota");
            var container = new Container((ulong)Interlocked.Increment(ref _nextContainerId), type, session, Math.Min(dmaLimit, quotas.Mappings));
            Interlocked.Increment(ref _liveContainers);
            files.Containers.Add(container.Id, container);
            return container;
        }
    }

    /// <summary>Destroys an empty container, as closing the container fd would.</summary>
    public void DestroyContainer(Session session, ulong containerId)
    {
        using var op = session.Enter();
        var container = FindContainer(session, containerId);
        lock (container.Sync)
        {
            if (container.Destroyed)
                throw ErrnoException.NotFound(Errno.ENOENT, $"container {containerId} was destroyed");
            if (container.Groups.Count > 0 || container.BoundDevices.Count > 0)
                throw ErrnoException.Busy($"container {containerId} still has {container.Groups.Count} group(s) and {container.BoundDevices.Count} device(s) attached");
            // As closing the container fd or destroying the IOAS does in Linux: its mappings go with
            // it, or they would pin memory that nothing could ever unmap.
            container.Iova.Clear(session.Memory);
            Destroy(container);
        }
    }

    /// <summary>VFIO_GROUP_SET_CONTAINER: a group claim, then the container's domain is attached.</summary>
    public void SetContainer(Session session, uint groupId, ulong containerId) =>
        metrics.CountClaim(() => ClaimGroupForContainer(session, groupId, containerId));

    private void ClaimGroupForContainer(Session session, uint groupId, ulong containerId)
    {
        using var op = session.Enter();
        var group = table.GetGroup(groupId);
        var container = FindContainer(session, containerId);
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(group);
            CheckAllowed(session, group);
            if (ContainerSetOn(group) is { } set)
                throw ErrnoException.Conflict(Errno.EINVAL, set.Owner == session
                    ? $"group {groupId} already has container {set.Id} set"
                    : $"group {groupId} already has a container set by another session");
            group.CheckGroupClaim();
            // Checked and joined under the container's lock, or a racing DestroyContainer could
            // destroy it in between and leave the group owned through a container teardown never sees.
            lock (container.Sync)
            {
                CheckLive(container);
                group.ClaimGroup(session);
                group.AttachUserDomain(container);
                _containerSet[group] = container;
                container.AddGroup(group);
            }
            table.PublishGroup(group);
        }
    }

    /// <summary>VFIO_GROUP_UNSET_CONTAINER: detach the domain and release the group.</summary>
    public void UnsetContainer(Session session, uint groupId)
    {
        using var op = session.Enter();
        var group = table.GetGroup(groupId);
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(group);
            if (ContainerSetOn(group) is not { } container || container.Owner != session)
                throw ErrnoException.Conflict(Errno.EINVAL, $"group {groupId} has no container of session {session.Id} set");
            if (group.Devices.Sum(d => d.OpenHandles) is var open and > 0)
                throw ErrnoException.Busy($"group {groupId} has {open} device handle(s) open; close them first");
            // BindDevice refuses a group held through a container (vfio_device_block_group), so
            // this cannot happen today; it stays so Unset never strands a device-path claim.
            if (group.Devices.Count(d => d.BoundBy is not null) is var bound and > 0)
                throw ErrnoException.Busy($"group {groupId} has {bound} device(s) bound with BindDevice; unbind them first");
            Unset(group, container);
            table.PublishGroup(group);
        }
    }

    /// <summary>iommufd-style bind: a device claim, and the container's domain attached to the group.</summary>
    public void BindDevice(Session session, PciAddress address, ulong containerId) =>
        metrics.CountClaim(() => ClaimDeviceIntoContainer(session, address, containerId));

    private void ClaimDeviceIntoContainer(Session session, PciAddress address, ulong containerId)
    {
        using var op = session.Enter();
        var device = table.GetDevice(address);
        var container = FindContainer(session, containerId);
        var group = device.Group;
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(device);
            if (device.Driver != Drivers.VfioPci)
                throw ErrnoException.Conflict(Errno.ENODEV, $"{address} is not bound to vfio-pci (driver: {device.Driver ?? "none"})");
            CheckAllowed(session, group);
            if (device.BoundBy == session)
                throw ErrnoException.Conflict(Errno.EINVAL, $"{address} is already bound by this session");
            group.CheckDeviceClaim(session);
            // vfio_device_block_group: a group held through the group path (a container set on it)
            // takes no device-path claim, or one session would hold it both ways at once.
            if (ContainerSetOn(group) is { } set)
                throw ErrnoException.Busy($"group {group.Id} is held through container {set.Id} (the group path); its devices cannot also be bound with BindDevice");
            if (group.Domain == DomainKind.User && group.Attached != container)
                throw ErrnoException.Busy($"group {group.Id} already has container {group.Attached?.Id}'s domain attached");
            // As in SetContainer: no DestroyContainer between the check and the join.
            lock (container.Sync)
            {
                CheckLive(container);
                group.ClaimDevice(session);
                if (group.Attached != container)
                {
                    group.AttachUserDomain(container);
                    container.AddGroup(group);
                }
                device.BoundBy = session;
                _boundInto[device] = container;
                container.AddDevice(device);
            }
            table.PublishGroup(group);
        }
    }

    /// <summary>Releases one device claim; the last claim releases the group.</summary>
    public void UnbindDevice(Session session, PciAddress address)
    {
        using var op = session.Enter();
        var device = table.GetDevice(address);
        var group = device.Group;
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(device);
            if (device.BoundBy != session)
                throw ErrnoException.Conflict(Errno.EINVAL, $"{address} is not bound by this session");
            if (device.OpenHandles > 0)
                throw ErrnoException.Busy($"{address} has {device.OpenHandles} handle(s) open; close them first");
            Unbind(device);
            table.PublishGroup(group);
        }
    }

    /// <summary>VFIO_IOMMU_GET_INFO. A type1v2 container without a group has no IOMMU yet (EINVAL).</summary>
    public IommuInfo GetIommuInfo(Session session, ulong containerId)
    {
        using var op = session.Enter();
        var container = IommuOf(session, containerId);
        return new IommuInfo(IovaSpace.PageSize, IovaSpace.UsableRanges, container.Iova.Available);
    }

    /// <summary>
    /// VFIO_IOMMU_MAP_DMA / IOMMU_IOAS_MAP: maps session memory for device access. A null
    /// <paramref name="iova"/> lets an IOMMUFD container pick one.
    /// </summary>
    public ulong MapDma(Session session, ulong containerId, ulong vaddr, ulong? iova, ulong size, bool read, bool write)
    {
        using var op = session.Enter();
        var container = FindContainer(session, containerId);
        // Checked and mapped under the container's lock, so neither the unset of a TYPE1V2
        // container's last group (which empties it) nor DestroyContainer can come in between
        // and leave the new mapping behind in a container without an IOMMU.
        lock (container.Sync)
        {
            CheckLive(container);
            CheckIommu(container);
            if (iova is null && container.Type == ContainerType.Type1v2)
                throw ErrnoException.Invalid("a TYPE1V2 container needs an explicit iova; only IOMMUFD picks one");
            return container.Iova.Map(session.Memory, vaddr, iova, size, read, write);
        }
    }

    /// <summary>VFIO_IOMMU_UNMAP_DMA / IOMMU_IOAS_UNMAP: returns once no DMA can touch the range.</summary>
    public ulong UnmapDma(Session session, ulong containerId, ulong iova, ulong size, bool all)
    {
        using var op = session.Enter();
        var container = IommuOf(session, containerId);
        return container.Iova.Unmap(session.Memory, iova, size, all,
            container.Type == ContainerType.Iommufd ? UnmapRules.Iommufd : UnmapRules.Type1v2);
    }

    /// <summary>
    /// VFIO_GROUP_GET_DEVICE_FD: the device must be bound to vfio-pci (ENODEV), its group not
    /// owned by another session (EPERM) and claimed by this one (EINVAL); one handle at a time (EBUSY).
    /// </summary>
    public DeviceHandle OpenDevice(Session session, PciAddress address)
    {
        using var op = session.Enter();
        var device = table.GetDevice(address);
        var group = device.Group;
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(device);
            if (device.Driver != Drivers.VfioPci)
                throw ErrnoException.Conflict(Errno.ENODEV, $"{address} is not bound to vfio-pci (driver: {device.Driver ?? "none"})");
            CheckAllowed(session, group);
            if (group.OwnerKind == OwnerKind.User && group.Owner != session)
                throw ErrnoException.NotPermitted($"group {group.Id} is {group.Describe()}");
            if (ContainerSetOn(group)?.Owner != session && device.BoundBy != session)
                throw ErrnoException.Conflict(Errno.EINVAL, $"{address}: claim it first (SetContainer on group {group.Id}, or BindDevice)");
            if (device.OpenHandles > 0)
                throw ErrnoException.Busy($"{address} is already open");
            var handle = new DeviceHandle((ulong)Interlocked.Increment(ref _nextHandleId), device, session, metrics, engines);
            device.OpenHandles++;
            FilesOf(session).Handles.Add(handle.Id, handle);
            return handle;
        }
    }

    /// <summary>Closes a device handle; the device is reset so the next user finds it clean.</summary>
    public void CloseDevice(Session session, ulong handleId)
    {
        using var op = session.Enter();
        Close(FindHandle(session, handleId));
    }

    /// <summary>
    /// VFIO_DEVICE_RESET: a function-level reset. Returns how long the reset takes, which the caller
    /// waits out before it answers: zero, unless a SLOW_RESET fault (SPEC §14) fires on it.
    /// </summary>
    public TimeSpan ResetDevice(Session session, ulong handleId)
    {
        using var op = session.Enter();
        var handle = FindHandle(session, handleId);
        var model = handle.Device.Model;
        lock (model.Sync)
        {
            handle.CheckOpen();
            model.Reset();
            return model.Faults.Any && model.Faults.Fire(FaultKind.SlowReset) is { } slow ? slow.Settings.Delay : TimeSpan.Zero;
        }
    }
    /// <summary>
    /// Reads a region of an open device (pread on the device fd): config space (index 7) in any
    /// size, a BAR (0-5) as one register access of 1, 2, 4 or 8 bytes.
    /// </summary>
    public byte[] RegionRead(Session session, ulong handleId, uint index, ulong offset, uint size) =>
        FindHandle(session, handleId).RegionRead(index, offset, size);

    /// <summary>
    /// Whether the write would set the device to heavy work (an NVMe doorbell): the caller runs such
    /// a write on the device engines (<see cref="Broker.Engines"/>). False for a handle that is not
    /// the session's (the write then fails as it would anyway).
    /// </summary>
    public bool RegionWriteStartsWork(Session session, ulong handleId, uint index, ulong offset)
    {
        ArgumentNullException.ThrowIfNull(session);
        try
        {
            return FindHandle(session, handleId).StartsWork(index, offset);
        }
        catch (ErrnoException)
        {
            return false;
        }
    }

    /// <summary>
    /// Writes a region of an open device (pwrite on the device fd). A DMA fault the write causes
    /// is reported on the session stream, as the device's own business; a device error fails the
    /// write with EIO.
    /// </summary>
    public void RegionWrite(Session session, ulong handleId, uint index, ulong offset, ReadOnlySpan<byte> data)
    {
        if (FindHandle(session, handleId).RegionWrite(index, offset, data).Error is { } error)
            throw ErrnoException.Conflict(Errno.EIO, error);
    }

    /// <summary>
    /// Releases everything a session holds. Called by the registry once the session admits no
    /// more operations and those in flight have finished, so nothing here races its own calls.
    /// </summary>
    internal void Teardown(Session session)
    {
        // Every step runs even if one before it failed (a broker bug): one bad device must not
        // leave the session's other groups owned by a session that no longer exists.
        var failures = new List<Exception>();
        void Step(Action step)
        {
            try
            {
                step();
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                failures.Add(e);
            }
        }

        // Devices first: reset and closed, so none can start DMA while its group is released.
        var files = _files.GetValueOrDefault(session);
        foreach (var handle in files?.Handles.Snapshot() ?? [])
            Step(() => Close(handle));
        // Then the containers are emptied and closed and the memory freed; the groups are released
        // and published last (SPEC §5), so a watcher that sees a group come back finds nothing of
        // the session left.
        var containers = files?.Containers.Snapshot() ?? [];
        foreach (var container in containers)
        {
            Step(() =>
            {
                container.Iova.Clear(session.Memory);
                lock (container.Sync)
                    Destroy(container);
            });
        }
        Step(session.Memory.Clear);
        foreach (var container in containers)
        {
            var (groups, devices) = container.Holdings();
            foreach (var device in devices)
            {
                Step(() =>
                {
                    lock (device.Group.Sync)
                    {
                        Unbind(device);
                        table.PublishGroup(device.Group);
                    }
                });
            }
            foreach (var group in groups)
            {
                Step(() =>
                {
                    lock (group.Sync)
                    {
                        if (ContainerSetOn(group) == container)
                        {
                            Unset(group, container);
                            table.PublishGroup(group);
                        }
                    }
                });
            }
        }
        _files.TryRemove(session, out _);
        if (failures.Count > 0)
            throw new AggregateException($"teardown of session {session.Id} hit {failures.Count} failure(s); everything else was released", failures);
    }

    /// <summary>
    /// Surprise removal (SPEC §14 SURPRISE_REMOVE): the device disappears even while a session owns
    /// it. Its open handles fail ENODEV from now on (and end their DMA streams), its device claim is
    /// released, and so is a group claim when it was the group's last device; the owning session is
    /// told <see cref="DeviceRemovedEvent"/>; watchers see the release, then the removal.
    /// </summary>
    internal void SurpriseRemove(PciAddress address) => table.SurpriseRemove(address, DetachRemoved);

    /// <summary>
    /// Lets go of what sessions hold of a device that is going by surprise: its handles fail from
    /// now on, its claims are released, its owner is told. Under the hotplug lock and the group's
    /// lock, before the table unplugs the device.
    /// </summary>
    internal void DetachRemoved(PciDevice device)
    {
        var group = device.Group;
        var owner = group.OwnerKind == OwnerKind.User ? group.Owner : null;
        foreach (var files in _files.Values)
        {
            foreach (var handle in files.Handles.Snapshot())
            {
                if (handle.Device != device)
                    continue;
                // Under the model's lock: no access of the handle is in flight, and none starts after.
                lock (device.Model.Sync)
                    handle.MarkGone();
            }
        }
        var released = false;
        if (device.BoundBy is not null)
        {
            Unbind(device);
            released = true;
        }
        if (group.Devices.Count == 1 && ContainerSetOn(group) is { } container)
        {
            Unset(group, container);
            released = true;
        }
        if (released)
            table.PublishGroup(group);
        owner?.Post(new DeviceRemovedEvent(device.Address));
    }

    /// <summary>An open device handle of the session; EBADF (NOT_FOUND) otherwise, like a closed fd.</summary>
    public DeviceHandle FindHandle(Session session, ulong handleId)
    {
        using var op = session.Enter();
        return FilesOf(session).Handles.Find(handleId);
    }

    /// <summary>The session's containers, for teardown checks and counts.</summary>
    internal Container[] ContainersOf(Session session) => _files.GetValueOrDefault(session)?.Containers.Snapshot() ?? [];

    /// <summary>The container set on a group with SetContainer, if any; read under the group's lock.</summary>
    internal Container? ContainerSetOn(IommuGroup group) => _containerSet.GetValueOrDefault(group);

    /// <summary>The container a device is bound into with BindDevice, if any; read under its group's lock.</summary>
    internal Container? BoundContainerOf(PciDevice device) => _boundInto.GetValueOrDefault(device);

    // Only inside the session's operation scope (or its teardown), so an ended session's files,
    // removed by its teardown, never come back.
    private SessionFiles FilesOf(Session session) => _files.GetOrAdd(session, static s => new SessionFiles(s));

    private Container FindContainer(Session session, ulong containerId) => FilesOf(session).Containers.Find(containerId);

    /// <summary>
    /// The principal's allowed groups (SPEC §12), checked on every claim path under the group's
    /// lock, so the devices matched against its globs are the group's devices at that instant.
    /// </summary>
    private static void CheckAllowed(Session session, IommuGroup group)
    {
        var policy = session.Grant.Groups;
        if (!policy.AllowsAll && !policy.Allows(group.Id, [.. group.Devices.Select(d => d.Address)]))
            throw ErrnoException.Denied($"{session.Principal} may not claim group {group.Id}: it is outside the groups its auth entry allows ({policy})");
    }

    private Container IommuOf(Session session, ulong containerId) => CheckIommu(FindContainer(session, containerId));

    private static Container CheckIommu(Container container)
    {
        if (!container.HasIommu)
            throw ErrnoException.Conflict(Errno.EINVAL, $"container {container.Id} has no IOMMU yet: set a group on it first (TYPE1V2)");
        return container;
    }

    private void Close(DeviceHandle handle)
    {
        var device = handle.Device;
        lock (device.Group.Sync)
        {
            lock (device.Model.Sync)
            {
                if (handle.Closed)
                    return;
                handle.Closed = true;
                device.Model.Reset();
            }
            device.OpenHandles--;
        }
        handle.SetInterruptListener(null);
        FilesOf(handle.Session).Handles.Remove(handle.Id);
    }

    private void Destroy(Container container)
    {
        if (container.Destroyed)
            return;
        container.Destroyed = true;
        FilesOf(container.Owner).Containers.Remove(container.Id);
        Interlocked.Decrement(ref _liveContainers);
    }

    private static void CheckLive(Container container)
    {
        lock (container.Sync)
        {
            if (container.Destroyed)
                throw ErrnoException.NotFound(Errno.ENOENT, $"container {container.Id} was destroyed");
        }
    }

    // Under the group's lock; preconditions checked.
    private void Unset(IommuGroup group, Container container)
    {
        var owner = group.Owner!;
        _containerSet.TryRemove(group, out _);
        group.DetachUserDomain();
        group.ReleaseGroup(owner);
        container.RemoveGroup(group);
    }

    // Under the group's lock; preconditions checked.
    private void Unbind(PciDevice device)
    {
        var group = device.Group;
        var container = _boundInto.TryRemove(device, out var into)
            ? into
            : throw new InvalidOperationException($"{device.Address} is bound by session {device.BoundBy?.Id} into no container");
        var owner = device.BoundBy!;
        device.BoundBy = null;
        container.RemoveDevice(device);
        group.ReleaseDevice(owner);
        // Every claim in a group shares one container, so the group leaves it only with the last claim.
        if (group.OwnerKind != OwnerKind.User)
            container.RemoveGroup(group);
    }
}
