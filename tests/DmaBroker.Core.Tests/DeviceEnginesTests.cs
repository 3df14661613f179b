using System.Globalization;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Topology;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// The device engines: threads of their own, at a lower priority, on which devices do their heavy
/// work (an NVMe doorbell's commands), so control calls take the CPU first.
/// </summary>
[Collection(RealThreadsCollection.Name)]
public sealed class DeviceEnginesTests
{
    [Fact]
    public async Task RunAsync_RunsOnAnEngineThreadAtTheNiceValue_AndCountsIt()
    {
        using var engines = new DeviceEngines(threads: 2, nice: 7);

        var (name, nice) = await engines.RunAsync(() => (Thread.CurrentThread.Name, ThreadNice()));

        Assert.StartsWith("device engine ", name, StringComparison.Ordinal);
        Assert.Equal((7, 7), (nice, engines.Nice));
        Assert.Equal(1, engines.Ran);
    }

    [Fact]
    public async Task RunAsync_Throws_TheCallerGetsTheException_AndTheEngineCarriesOn()
    {
        using var engines = new DeviceEngines(threads: 1, nice: 0);

        var e = await Assert.ThrowsAsync<ErrnoException>(() => engines.RunAsync(() => throw ErrnoException.Invalid("bad doorbell")));
        Assert.Equal("bad doorbell", e.Message);
        Assert.Equal(42, await engines.RunAsync(() => 42));
        Assert.Equal(2, engines.Ran);
    }

    [Fact]
    public async Task RunAsync_ManyCallersAtOnce_EachGetsItsOwnResult()
    {
        using var engines = new DeviceEngines(threads: 2, nice: 0);
        var count = 0;

        var results = await Task.WhenAll(Enumerable.Range(0, 1000).Select(i => Task.Run(() => engines.RunAsync(() =>
        {
            Interlocked.Increment(ref count);
            return i;
        }))));

        Assert.Equal(Enumerable.Range(0, 1000), results);
        Assert.Equal((1000, 1000L), (count, engines.Ran));
    }

    [Fact]
    public async Task Disposed_RunAsync_ObjectDisposed()
    {
        var engines = new DeviceEngines(threads: 1, nice: 0);
        await engines.RunAsync(() => 1);
        engines.Dispose();

        Assert.Throws<ObjectDisposedException>(() => { _ = engines.RunAsync(() => 1); });
    }

    [Theory]
    [InlineData(0, 0)]
    [InlineData(1, 20)]
    [InlineData(1, -1)]
    public void Create_OutOfRange_Refused(int threads, int nice) =>
        Assert.ThrowsAny<ArgumentOutOfRangeException>(() => new DeviceEngines(threads, nice));

    [Fact]
    public async Task RegionWriteStartsWork_NvmeDoorbellsOnly()
    {
        await using var d = NvmeTestDriver.Create(pages: 4, broker: new Broker(TopologyDocument.Default(), time: new FakeTimeProvider()));
        var vfio = d.Broker.Vfio;
        vfio.SetContainer(d.Session, DmaRig.EduGroups[0], d.Container.Id);
        var edu = vfio.OpenDevice(d.Session, DmaRig.Edus[0]).Id;

        // An NVMe submission queue's tail doorbell (and any after it) runs commands; its registers do not.
        Assert.True(vfio.RegionWriteStartsWork(d.Session, d.Handle.Id, 0, NvmeController.RegDoorbells));
        Assert.True(vfio.RegionWriteStartsWork(d.Session, d.Handle.Id, 0, NvmeController.RegDoorbells + 8));
        Assert.False(vfio.RegionWriteStartsWork(d.Session, d.Handle.Id, 0, NvmeController.RegCc));
        Assert.False(vfio.RegionWriteStartsWork(d.Session, d.Handle.Id, 7, NvmeController.RegDoorbells));
        // An edu device's registers are quick; a handle that is not the session's is not device work.
        Assert.False(vfio.RegionWriteStartsWork(d.Session, edu, 0, 0x98));
        Assert.False(vfio.RegionWriteStartsWork(d.Session, 9999, 0, NvmeController.RegDoorbells));
    }

    // The calling thread's nice value: field 19 of /proc/thread-self/stat (after the command's parentheses).
    private static int ThreadNice()
    {
        var stat = File.ReadAllText("/proc/thread-self/stat");
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return int.Parse(fields[16], CultureInfo.InvariantCulture);
    }
}
