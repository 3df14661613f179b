using BenchmarkDotNet.Attributes;
using DmaBroker.Core;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using DmaBroker.Server.Services;
using Google.Protobuf;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Benchmarks;

// BenchmarkDotNet's classes for MicroSection: public and unsealed, as it requires. Each builds an
// in-process broker core (no gRPC) in its global setup.

/// <summary>A broker core whose session, which nothing pings, outlives the run.</summary>
internal static class MicroCore
{
    /// <summary>A lease longer than any run: a slow setup of 65,535 mappings on a loaded machine must not end the session.</summary>
    public static Broker NewBroker() => new(TopologyDocument.Default(), new BrokerOptions
    {
        Sessions = new SessionOptions { LeaseTtl = TimeSpan.FromHours(1) },
    });

    /// <summary>Edu 0000:08:00.0 (group 14) in a type1v2 container with <paramref name="bytes"/> mapped at <see cref="Host.Iova"/>, Bus Master on.</summary>
    public static DeviceHandle OpenEdu(Broker broker, Session session, int bytes)
    {
        var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        broker.Vfio.SetContainer(session, 14, container.Id);
        var block = session.Allocate((ulong)bytes);
        broker.Vfio.MapDma(session, container.Id, block.Vaddr, Host.Iova, (ulong)bytes, read: true, write: true);
        var handle = broker.Vfio.OpenDevice(session, PciAddress.Parse("0000:08:00.0"));
        handle.MmioWrite(7, 4, 2, 0x6);
        return handle;
    }
}

/// <summary>
/// A 64-byte device write through IOVA translation, at random ones of <see cref="Mappings"/> 4 KiB
/// mappings: with a binary search 65,535 mappings cost about log2(65535)/log2(16) = 4 times the
/// lookup of 16, where a linear scan would cost ~4000 times.
/// </summary>
public class TranslationBenchmarks
{
    private Broker _broker = null!;
    private DeviceHandle _handle = null!;
    private ulong[] _targets = [];
    private readonly byte[] _data = new byte[64];
    private int _next;

    /// <summary>How many mappings the container holds.</summary>
    [ParamsSource(nameof(MappingCounts))]
    public int Mappings { get; set; }

    /// <summary>16, and the most a container takes by default (fewer in a quick run).</summary>
    public static IEnumerable<int> MappingCounts => [16, MicroSection.ManyMappings];

    [GlobalSetup]
    public void Setup()
    {
        _broker = MicroCore.NewBroker();
        var session = _broker.Sessions.Open("micro-translation");
        var container = _broker.Vfio.CreateContainer(session, ContainerType.Iommufd);
        _broker.Vfio.BindDevice(session, PciAddress.Parse("0000:0b:00.0"), container.Id);
        var block = session.Allocate((ulong)Mappings * 4096);
        for (var i = 0; i < Mappings; i++)
            _broker.Vfio.MapDma(session, container.Id, block.Vaddr + (ulong)i * 4096, 0x100000 + (ulong)i * 8192, 4096, read: true, write: true);
        _handle = _broker.Vfio.OpenDevice(session, PciAddress.Parse("0000:0b:00.0"));
        _handle.MmioWrite(7, 4, 2, 0x6);
        var random = new Random(1);
        _targets = [.. Enumerable.Range(0, 4096).Select(_ => 0x100000 + (ulong)random.Next(Mappings) * 8192)];
    }

    [Benchmark]
    public bool DmaWrite64() => _handle.DmaWrite(_targets[_next++ & 4095], _data).Ok;

    [GlobalCleanup]
    public void Cleanup() => _broker.DisposeAsync().AsTask().GetAwaiter().GetResult();
}

/// <summary>The floor under a 64-byte DMA write: copying the 64 bytes, nothing else.</summary>
public class CopyBenchmarks
{
    private readonly byte[] _source = new byte[64];
    private readonly byte[] _destination = new byte[64 * 1024];
    private int _next;

    [Benchmark]
    public void Copy64() => _source.AsSpan().CopyTo(_destination.AsSpan((_next++ & 1023) * 64, 64));
}

/// <summary>
/// A claim and its release on the core: SetContainer of a free group (the ownership check of SPEC §3,
/// the domain attached) and UnsetContainer; beside it two GetGroupStatus calls, the same session
/// and group look-ups without an ownership change.
/// </summary>
public class ClaimBenchmarks
{
    private Broker _broker = null!;
    private Session _session = null!;
    private ulong _container;

    [GlobalSetup]
    public void Setup()
    {
        _broker = MicroCore.NewBroker();
        _session = _broker.Sessions.Open("micro-claim");
        _container = _broker.Vfio.CreateContainer(_session, ContainerType.Type1v2).Id;
    }

    [Benchmark]
    public void ClaimRelease()
    {
        _broker.Vfio.SetContainer(_session, 14, _container);
        _broker.Vfio.UnsetContainer(_session, 14);
    }

    [Benchmark]
    public bool GroupStatusTwice() => _broker.Vfio.GetGroupStatus(_session, 14).Viable & _broker.Vfio.GetGroupStatus(_session, 14).Viable;

    [GlobalCleanup]
    public void Cleanup() => _broker.DisposeAsync().AsTask().GetAwaiter().GetResult();
}

/// <summary>
/// A coalesced batch of 256 64-byte writes as the DMA service runs it (every write on the device,
/// one batch_completion built), per write; beside it the same 256 writes on the core alone.
/// </summary>
public class CoalescedBenchmarks
{
    /// <summary>Writes per batch.</summary>
    public const int BatchSize = 256;

    private Broker _broker = null!;
    private DeviceHandle _handle = null!;
    private Wire.DmaRequest _batch = null!;
    private readonly byte[] _data = new byte[64];

    [GlobalSetup]
    public void Setup()
    {
        _broker = MicroCore.NewBroker();
        _handle = MicroCore.OpenEdu(_broker, _broker.Sessions.Open("micro-coalesced"), Host.MappedBytes);
        var batch = new Wire.DmaBatch { Coalesce = true };
        var data = ByteString.CopyFrom(_data);
        for (var i = 0; i < BatchSize; i++)
            batch.Requests.Add(new Wire.DmaRequest { Tag = (ulong)i, Write = new Wire.DmaWrite { Iova = Host.Iova + (ulong)i * 64, Data = data } });
        _batch = new Wire.DmaRequest { Tag = 1, Batch = batch };
    }

    [Benchmark(OperationsPerInvoke = BatchSize)]
    public int CoalescedBatch()
    {
        var outgoing = DmaService.ExecuteCoalesced(_handle, _batch);
        outgoing.Release();
        return outgoing.Response.BatchCompletion.Results.Count;
    }

    [Benchmark(OperationsPerInvoke = BatchSize)]
    public bool CoreWrites()
    {
        var ok = true;
        for (var i = 0; i < BatchSize; i++)
            ok &= _handle.DmaWrite(Host.Iova + (ulong)i * 64, _data).Ok;
        return ok;
    }

    [GlobalCleanup]
    public void Cleanup() => _broker.DisposeAsync().AsTask().GetAwaiter().GetResult();
}
