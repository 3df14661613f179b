using DmaBroker.Core.Iommu;

namespace DmaBroker.Core.Ownership;

/// <summary>
/// A user IOMMU domain that a group can have attached (in Linux, an UNMANAGED
/// <c>iommu_domain</c>). A VFIO container provides it; ownership only attaches, compares,
/// drains and names it, so it needs to know nothing more of containers.
/// </summary>
internal interface IUserDomain
{
    /// <summary>The id of the container that provides the domain, as messages name it.</summary>
    ulong Id { get; }

    /// <summary>The address space the group's device DMA translates through while the domain is attached.</summary>
    IovaSpace Iova { get; }
}
