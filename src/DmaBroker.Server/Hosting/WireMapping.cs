using DmaBroker.Core;
using DmaBroker.Core.Faults;
using DmaBroker.Core.Topology;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Hosting;

/// <summary>Core views to wire messages and back; nothing here decides anything.</summary>
internal static class WireMapping
{
    public static Wire.Device ToProto(this DeviceInfo d) => new()
    {
        Address = d.Address.ToString(),
        VendorId = d.VendorId,
        DeviceId = d.DeviceId,
        ClassCode = d.ClassCode,
        Model = d.Model,
        GroupId = d.GroupId,
        Driver = d.Driver ?? "",
        DriverManagedDma = d.DriverManagedDma,
    };

    public static Wire.Group ToProto(this GroupInfo g)
    {
        var group = new Wire.Group
        {
            Id = g.Id,
            OwnerKind = g.OwnerKind switch
            {
                OwnerKind.Kernel => Wire.OwnerKind.Kernel,
                OwnerKind.User => Wire.OwnerKind.User,
                _ => Wire.OwnerKind.None,
            },
            OwnerCount = (uint)g.OwnerCount,
            OwnerSession = g.OwnerSession,
            Generation = g.Generation,
            Domain = g.Domain switch
            {
                DomainKind.Blocking => Wire.DomainKind.Blocking,
                DomainKind.User => Wire.DomainKind.User,
                _ => Wire.DomainKind.Default,
            },
        };
        foreach (var address in g.Devices)
            group.Devices.Add(address.ToString());
        return group;
    }

    public static Wire.Snapshot ToProto(this TopologySnapshot s)
    {
        var snapshot = new Wire.Snapshot();
        snapshot.Groups.AddRange(s.Groups.Values.Select(ToProto));
        snapshot.Devices.AddRange(s.Devices.Values.Select(ToProto));
        return snapshot;
    }

    public static Wire.WatchEvent ToProto(this TopologyEvent e)
    {
        var ev = new Wire.WatchEvent { Revision = e.Revision };
        switch (e.Change)
        {
            case null:
                ev.Snapshot = e.Snapshot!.ToProto();
                break;
            case GroupChanged g:
                ev.Group = g.Group.ToProto();
                break;
            case DeviceChanged d:
                ev.Device = d.Device.ToProto();
                break;
            case DeviceRemoved r:
                ev.DeviceRemoved = new Wire.DeviceRemoved { Address = r.Address.ToString() };
                break;
            case GroupRemoved r:
                ev.GroupRemoved = new Wire.GroupRemoved { GroupId = r.GroupId };
                break;
            case SessionEnded s:
                ev.SessionEnded = new Wire.SessionEnded { SessionId = s.SessionId, Reason = s.Reason };
                break;
        }
        return ev;
    }

    public static Core.Vfio.ContainerType ToCore(this Wire.ContainerType type) => type switch
    {
        Wire.ContainerType.Type1V2 => Core.Vfio.ContainerType.Type1v2,
        Wire.ContainerType.Iommufd => Core.Vfio.ContainerType.Iommufd,
        _ => throw ErrnoException.Invalid($"container type {type} is not one of TYPE1V2, IOMMUFD"),
    };

    /// <summary>A request's fault settings; a probability of 0 reads as 100 (proto3's default stands for SPEC's).</summary>
    public static FaultSettings ToCore(this Wire.InjectFaultRequest r) => new(r.Kind switch
    {
        Wire.FaultKind.Unspecified => throw ErrnoException.Invalid("kind is required: one of FAULT_KIND_IOMMU_FAULT … FAULT_KIND_LINK_DOWN"),
        var kind => (FaultKind)(int)kind,
    })
    {
        Count = r.Count,
        Delay = TimeSpan.FromMilliseconds(r.DelayMs),
        Status = r.Status,
        Probability = r.ProbabilityPercent == 0 ? 100 : (int)Math.Min(r.ProbabilityPercent, int.MaxValue),
        Seed = r.Seed,
        Opcode = r.HasOpcode ? r.Opcode : null,
        LbaStart = r.LbaStart,
        LbaCount = r.LbaCount,
    };

    public static Wire.InjectedFault ToProto(this InjectedFault f)
    {
        var s = f.Settings;
        var fault = new Wire.InjectedFault
        {
            FaultId = f.Id,
            Address = f.Address.ToString(),
            Kind = (Wire.FaultKind)(int)s.Kind,
            Count = s.Count,
            DelayMs = (uint)s.Delay.TotalMilliseconds,
            Status = s.Status,
            ProbabilityPercent = (uint)s.Probability,
            Seed = s.Seed,
            LbaStart = s.LbaStart,
            LbaCount = s.LbaCount,
            Fired = (ulong)f.Fired,
            Spent = f.Spent,
        };
        if (s.Opcode is { } opcode)
            fault.Opcode = opcode;
        return fault;
    }

    public static Wire.SessionInfo ToProto(this SessionSummary s)
    {
        var info = new Wire.SessionInfo
        {
            SessionId = s.Id,
            Principal = s.Principal,
            ClientName = s.ClientName,
            Peer = s.Peer,
            AgeMs = (ulong)Math.Max(0, s.Age.TotalMilliseconds),
            MemoryBytes = s.MemoryBytes,
            DmaStreams = (uint)s.DmaStreams,
            Replica = s.Replica,
        };
        info.Groups.AddRange(s.Groups);
        return info;
    }
}
