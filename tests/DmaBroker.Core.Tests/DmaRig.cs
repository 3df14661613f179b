using System.Globalization;
using System.Text;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// A broker on the default topology with one session and one container of a given flavour, and the
/// four free edu devices (0000:08:00.0..0000:0b:00.0, groups 14..17) to claim, open and drive. A
/// TYPE1V2 container claims a group with SetContainer, an IOMMUFD one a device with BindDevice.
/// </summary>
internal sealed class DmaRig : IAsyncDisposable
{
    public const ulong Page = IovaSpace.PageSize;
    public static readonly PciAddress[] Edus = [.. new[] { "0000:08:00.0", "0000:09:00.0", "0000:0a:00.0", "0000:0b:00.0" }.Select(PciAddress.Parse)];
    public static readonly uint[] EduGroups = [14, 15, 16, 17];

    private readonly List<MemoryBlock> _blocks = [];

    private DmaRig(Broker broker, FakeTimeProvider clock, ContainerType flavour)
    {
        Broker = broker;
        Clock = clock;
        Session = broker.Sessions.Open("rig");
        Container = broker.Vfio.CreateContainer(Session, flavour);
    }

    public Broker Broker { get; }
    /// <summary>The broker's clock: leases, and the edu DMA timer, move only when a test advances it.</summary>
    public FakeTimeProvider Clock { get; }
    public Session Session { get; }
    public Container Container { get; }
    public ContainerType Flavour => Container.Type;
    public VfioDriver Vfio => Broker.Vfio;

    /// <summary>A rig whose container has claimed the first <paramref name="claimed"/> edu devices.</summary>
    public static DmaRig Create(ContainerType flavour, int claimed = 1, SessionOptions? sessions = null)
    {
        var clock = new FakeTimeProvider();
        var broker = new Broker(TopologyDocument.Default(), new BrokerOptions { Sessions = sessions ?? new SessionOptions() }, clock);
        var rig = new DmaRig(broker, clock, flavour);
        for (var i = 0; i < claimed; i++)
            rig.Claim(i);
        return rig;
    }

    /// <summary>Claims edu device <paramref name="i"/> into the container, in the flavour's own way.</summary>
    public void Claim(int i)
    {
        if (Flavour == ContainerType.Type1v2)
            Vfio.SetContainer(Session, EduGroups[i], Container.Id);
        else
            Vfio.BindDevice(Session, Edus[i], Container.Id);
    }

    public void Release(int i)
    {
        if (Flavour == ContainerType.Type1v2)
            Vfio.UnsetContainer(Session, EduGroups[i]);
        else
            Vfio.UnbindDevice(Session, Edus[i]);
    }

    /// <summary>Opens edu device <paramref name="i"/>, with Bus Master on unless told otherwise.</summary>
    public DeviceHandle Open(int i = 0, bool busMaster = true)
    {
        var handle = Vfio.OpenDevice(Session, Edus[i]);
        SetBusMaster(handle, busMaster);
        return handle;
    }

    /// <summary>The driver sets or clears the command register's Bus Master bit (config offset 4, bit 2), memory space on.</summary>
    public static void SetBusMaster(DeviceHandle handle, bool on) =>
        Assert.True(handle.MmioWrite(DeviceModel.ConfigIndex, 4, 2, DeviceModel.CommandMemory | (on ? DeviceModel.CommandBusMaster : 0u)).Ok);

    /// <summary>Allocates session memory; the rig remembers the block so <see cref="Table"/> can show its pins.</summary>
    public MemoryBlock Allocate(ulong size)
    {
        var block = Session.Allocate(size);
        _blocks.Add(block);
        return block;
    }

    public ulong Map(ulong vaddr, ulong? iova, ulong size, bool read = true, bool write = true) =>
        Vfio.MapDma(Session, Container.Id, vaddr, iova, size, read, write);

    public ulong Unmap(ulong iova, ulong size) => Vfio.UnmapDma(Session, Container.Id, iova, size, all: false);

    /// <summary>Everything the session has been told so far (faults, interrupts).</summary>
    public List<SessionEvent> DrainEvents() => Drain(Session);

    public static List<SessionEvent> Drain(Session session)
    {
        var events = new List<SessionEvent>();
        while (session.Events.TryRead(out var ev))
            events.Add(ev);
        return events;
    }

    /// <summary>
    /// The mapping table as far as it can be seen from outside: how many mappings, how many are left,
    /// what each probed page allows a device (read, write, neither), and the session's memory pins.
    /// The default probes cover [0, 0x40000), both edges of the MSI window and the top of the aperture.
    /// </summary>
    public string Table(IEnumerable<ulong>? extraProbes = null)
    {
        var probes = new SortedSet<ulong>();
        for (ulong p = 0; p < 0x40000; p += Page)
            probes.Add(p);
        foreach (var p in new[] { IovaSpace.MsiFirst - 2 * Page, IovaSpace.MsiFirst - Page, IovaSpace.MsiFirst, IovaSpace.MsiLast + 1 - Page, IovaSpace.MsiLast + 1, IovaSpace.MsiLast + 1 + Page, IovaSpace.ApertureLast + 1 - 2 * Page, IovaSpace.ApertureLast + 1 - Page })
            probes.Add(p);
        foreach (var p in extraProbes ?? [])
        {
            if (p <= IovaSpace.ApertureLast)
                probes.Add(p & ~IovaSpace.PageMask);
        }
        var sb = new StringBuilder();
        var space = Container.Iova;
        sb.Append(CultureInfo.InvariantCulture, $"count={space.Count} available={space.Available} used={Session.Memory.Used} blocks={Session.Memory.BlockCount}\n");
        foreach (var block in _blocks)
            sb.Append(CultureInfo.InvariantCulture, $"block 0x{block.Vaddr:x}+0x{block.Size:x} pins={block.Pins} freed={block.Freed}\n");
        foreach (var p in probes)
        {
            var r = space.Check(p, Page, DmaAccess.Read).Ok;
            var w = space.Check(p, Page, DmaAccess.Write).Ok;
            if (r || w)
                sb.Append(CultureInfo.InvariantCulture, $"0x{p:x}:{(r ? "R" : "")}{(w ? "W" : "")} ");
        }
        return sb.ToString();
    }

    /// <summary>A block's bytes as the session holds them, read directly (also after the session ended).</summary>
    public static byte[] Contents(MemoryBlock block) => block.Bytes.ToArray();

    public ValueTask DisposeAsync() => new(Broker.DisposeAsync().AsTask().WaitAsync(CoreState.Timeout));
}
