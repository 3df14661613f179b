using DmaBroker.Core.Ownership;

namespace DmaBroker.Core.Sessions;

/// <summary>What VFIO_GROUP_GET_STATUS reports to one session.</summary>
public readonly record struct GroupStatus(bool Viable, bool ContainerSet);

/// <summary>
/// The user side of VFIO and iommufd (SPEC §4): containers, the group flow
/// (SetContainer/UnsetContainer, a group claim) and the device flow (BindDevice/UnbindDevice,
/// a device claim). Each call runs inside the session's operation scope and checks everything
/// before it changes anything, so a rejected call leaves no trace.
/// </summary>
public sealed class VfioDriver(OwnershipTable table)
{
    private long _nextContainerId;
    private int _liveContainers;

    public int LiveContainers => Volatile.Read(ref _liveContainers);

    public GroupStatus GetGroupStatus(Session session, uint groupId)
    {
        using var op = session.Enter();
        var group = table.GetGroup(groupId);
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(group);
            var mine = group.ContainerSet?.Owner == session;
            return new GroupStatus(group.OwnerCount == 0 || mine, mine);
        }
    }

    public Container CreateContainer(Session session, ContainerType type)
    {
        using var op = session.Enter();
        var container = new Container((ulong)Interlocked.Increment(ref _nextContainerId), type, session);
        Interlocked.Increment(ref _liveContainers);
        return session.AddContainer(container);
    }

    /// <summary>Destroys an empty container, as closing the container fd would.</summary>
    public void DestroyContainer(Session session, ulong containerId)
    {
        using var op = session.Enter();
        var container = session.FindContainer(containerId);
        lock (container.Sync)
        {
            if (container.Destroyed)
                throw ErrnoException.NotFound(Errno.ENOENT, $"container {containerId} was destroyed");
            if (container.Groups.Count > 0 || container.BoundDevices.Count > 0)
                throw ErrnoException.Busy($"container {containerId} still has {container.Groups.Count} group(s) and {container.BoundDevices.Count} device(s) attached");
            Destroy(container);
        }
    }

    /// <summary>VFIO_GROUP_SET_CONTAINER: a group claim, then the container's domain is attached.</summary>
    public void SetContainer(Session session, uint groupId, ulong containerId)
    {
        using var op = session.Enter();
        var group = table.GetGroup(groupId);
        var container = session.FindContainer(containerId);
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(group);
            if (group.ContainerSet is { } set)
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
                group.ContainerSet = container;
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
            if (group.ContainerSet is not { } container || container.Owner != session)
                throw ErrnoException.Conflict(Errno.EINVAL, $"group {groupId} has no container of session {session.Id} set");
            if (group.Devices.Sum(d => d.OpenHandles) is var open and > 0)
                throw ErrnoException.Busy($"group {groupId} has {open} device handle(s) open; close them first");
            if (group.Devices.Count(d => d.BoundBy is not null) is var bound and > 0)
                throw ErrnoException.Busy($"group {groupId} has {bound} device(s) bound with BindDevice; unbind them first");
            Unset(group, container);
            table.PublishGroup(group);
        }
    }

    /// <summary>iommufd-style bind: a device claim, and the container's domain attached to the group.</summary>
    public void BindDevice(Session session, PciAddress address, ulong containerId)
    {
        using var op = session.Enter();
        var device = table.GetDevice(address);
        var container = session.FindContainer(containerId);
        var group = device.Group;
        lock (group.Sync)
        {
            OwnershipTable.CheckPresent(device);
            if (device.Driver != Drivers.VfioPci)
                throw ErrnoException.Conflict(Errno.ENODEV, $"{address} is not bound to vfio-pci (driver: {device.Driver ?? "none"})");
            if (device.BoundBy == session)
                throw ErrnoException.Conflict(Errno.EINVAL, $"{address} is already bound by this session");
            group.CheckDeviceClaim(session);
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
                device.BoundContainer = container;
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

    /// <summary>
    /// Releases everything a session holds. Called by the registry once the session admits no
    /// more operations and those in flight have finished, so nothing here races its own calls.
    /// </summary>
    internal void Teardown(Session session)
    {
        foreach (var container in session.Containers())
        {
            var (groups, devices) = container.Holdings();
            foreach (var device in devices)
            {
                lock (device.Group.Sync)
                {
                    device.OpenHandles = 0;
                    Unbind(device);
                    table.PublishGroup(device.Group);
                }
            }
            foreach (var group in groups)
            {
                lock (group.Sync)
                {
                    if (group.ContainerSet == container)
                    {
                        foreach (var d in group.Devices)
                            d.OpenHandles = 0;
                        Unset(group, container);
                        table.PublishGroup(group);
                    }
                }
            }
            lock (container.Sync)
                Destroy(container);
        }
    }

    private void Destroy(Container container)
    {
        if (container.Destroyed)
            return;
        container.Destroyed = true;
        container.Owner.RemoveContainer(container);
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
    private static void Unset(IommuGroup group, Container container)
    {
        var owner = group.Owner!;
        group.ContainerSet = null;
        group.DetachUserDomain();
        group.ReleaseGroup(owner);
        container.RemoveGroup(group);
    }

    // Under the group's lock; preconditions checked.
    private static void Unbind(PciDevice device)
    {
        var group = device.Group;
        var container = device.BoundContainer!;
        var owner = device.BoundBy!;
        device.BoundBy = null;
        device.BoundContainer = null;
        container.RemoveDevice(device);
        group.ReleaseDevice(owner);
        // Every claim in a group shares one container, so the group leaves it only with the last claim.
        if (group.OwnerKind != OwnerKind.User)
            container.RemoveGroup(group);
    }
}
