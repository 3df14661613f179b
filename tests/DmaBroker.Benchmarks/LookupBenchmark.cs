using System.Diagnostics;
using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Benchmarks;

/// <summary>
/// IOVA translation cost with few and with 65,535 mappings, side by side in one run: with a
/// binary search the ratio stays near log2(65535)/log2(16) = 4, where a linear scan would be ~4000.
/// </summary>
internal static class LookupBenchmark
{
    public static async Task RunAsync(int rounds)
    {
        Console.WriteLine("IOVA translation, 64-byte device writes at random mappings (core, no gRPC):");
        var small = await MeasureAsync(16, rounds);
        var large = await MeasureAsync(65535, rounds);
        Console.WriteLine($"  {16,6} mappings   {small,8:F1} ns/op");
        Console.WriteLine($"  {65535,6} mappings   {large,8:F1} ns/op");
        Console.WriteLine($"  ratio              {large / small,8:F2}x   (linear lookup would be ~4096x)");
    }

    private static async Task<double> MeasureAsync(int mappings, int rounds)
    {
        // Nothing pings this session: a lease longer than the run keeps a slow setup of 65,535
        // mappings on a loaded machine from ending it ("session 1 has ended").
        await using var broker = new Broker(TopologyDocument.Default(), new BrokerOptions
        {
            Sessions = new Core.Sessions.SessionOptions { LeaseTtl = TimeSpan.FromHours(1) },
        });
        var session = broker.Sessions.Open("lookup");
        var container = broker.Vfio.CreateContainer(session, ContainerType.Iommufd);
        broker.Vfio.BindDevice(session, PciAddress.Parse("0000:0b:00.0"), container.Id);
        var block = session.Allocate((ulong)mappings * 4096);
        for (var i = 0; i < mappings; i++)
            broker.Vfio.MapDma(session, container.Id, block.Vaddr + (ulong)i * 4096, 0x100000 + (ulong)i * 8192, 4096, read: true, write: true);
        var handle = broker.Vfio.OpenDevice(session, PciAddress.Parse("0000:0b:00.0"));
        handle.MmioWrite(7, 4, 2, 0x6);
        var data = new byte[64];
        var random = new Random(1);
        var targets = Enumerable.Range(0, 4096).Select(_ => 0x100000 + (ulong)random.Next(mappings) * 8192).ToArray();
        var best = double.MaxValue;
        for (var round = 0; round < rounds; round++)
        {
            const int ops = 1_000_000;
            var clock = Stopwatch.StartNew();
            for (var i = 0; i < ops; i++)
            {
                if (!handle.DmaWrite(targets[i & 4095], data).Ok)
                    throw new InvalidOperationException("translation failed");
            }
            best = Math.Min(best, clock.Elapsed.TotalNanoseconds / ops);
        }
        return best;
    }
}
