using DmaBroker.Core.Iommu;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;

namespace DmaBroker.Core.Vfio;

/// <summary>The two container flavours: a legacy VFIO type1v2 container or an iommufd IOAS.</summary>
public enum ContainerType
{
    /// <summary>A legacy VFIO container (VFIO_TYPE1v2_IOMMU): no IOMMU until its first group is set; explicit IOVAs only.</summary>
    Type1v2,
    /// <summary>An iommufd IOAS: an IOMMU from the start, and it can pick IOVAs itself.</summary>
    Iommufd,
}

/// <summary>
/// An IOMMU address space owned by one session. Its group and device sets change only under the
/// lock of the group concerned and then this container's lock.
/// </summary>
public sealed class Container(ulong id, ContainerType type, Session owner, int dmaLimit) : IUserDomain
{
    /// <summary>The container's lock (lock 3 of <c>docs/locking.md</c>): taken after a group's lock, before the IOVA space's.</summary>
    internal readonly Lock Sync = new();

    /// <summary>The address space: mappings, and the lock that fences device accesses.</summary>
    internal IovaSpace Iova { get; } = new(dmaLimit);

    IovaSpace IUserDomain.Iova => Iova;

    /// <summary>The container's number in the broker, as its owner's calls name it.</summary>
    public ulong Id { get; } = id;

    /// <summary>Which Linux interface's rules the container follows (unmap, IOVA choice, when it has an IOMMU).</summary>
    public ContainerType Type { get; } = type;

    /// <summary>The session that created it; no other session can use or see it.</summary>
    public Session Owner { get; } = owner;

    /// <summary>Groups whose user domain is this container's.</summary>
    internal HashSet<IommuGroup> Groups { get; } = [];
    /// <summary>Devices bound into this container with BindDevice.</summary>
    internal HashSet<PciDevice> BoundDevices { get; } = [];
    internal bool Destroyed { get; set; }

    /// <summary>A TYPE1V2 container has no IOMMU until its first group is set.</summary>
    public bool HasIommu
    {
        get
        {
            lock (Sync)
                return Type == ContainerType.Iommufd || Groups.Count > 0;
        }
    }

    internal void AddGroup(IommuGroup group)
    {
        lock (Sync)
            Groups.Add(group);
    }

    /// <summary>Removes a group whose domain was detached.</summary>
    internal void RemoveGroup(IommuGroup group)
    {
        lock (Sync)
        {
            Groups.Remove(group);
            // A type1v2 container loses its IOMMU with its last group, and with it every
            // mapping; an iommufd IOAS lives on without devices, as in Linux.
            if (Groups.Count == 0 && Type == ContainerType.Type1v2)
                Iova.Clear(Owner.Memory);
        }
    }

    internal void AddDevice(PciDevice device)
    {
        lock (Sync)
            BoundDevices.Add(device);
    }

    internal void RemoveDevice(PciDevice device)
    {
        lock (Sync)
            BoundDevices.Remove(device);
    }

    internal (IommuGroup[] Groups, PciDevice[] Devices) Holdings()
    {
        lock (Sync)
            return ([.. Groups], [.. BoundDevices]);
    }
}
