using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Ctl;

/// <summary>dmactl dma and bench: claim a device for a private session and drive its DMA.</summary>
internal static class DeviceCommands
{
    private const ulong Iova = 0x10_0000;

    /// <summary>A session holding one device's group, with memory mapped and the device open.</summary>
    private sealed record Rig(BrokerSession Session, DmaBuffer Buffer, VfioDevice Device, DmaChannel Dma) : IAsyncDisposable
    {
        public static async Task<Rig> OpenAsync(CommandContext c, string address, ulong bytes)
        {
            var info = (await c.Client.ListDevicesAsync(c.Stop)).Devices.FirstOrDefault(d => d.Address == address)
                ?? throw new UsageException($"no device {address}; see 'dmactl devices'");
            var session = await c.Client.OpenSessionAsync("dmactl", c.Stop);
            try
            {
                var container = await session.NewContainerAsync(ContainerType.Type1V2, c.Stop);
                await container.SetGroupAsync(info.GroupId, c.Stop);
                var buffer = await session.AllocateAsync(bytes, c.Stop);
                await container.MapAsync(buffer, Iova, cancellationToken: c.Stop);
                var device = await session.OpenDeviceAsync(address, c.Stop);
                await device.EnableBusMasterAsync(c.Stop);
                return new Rig(session, buffer, device, await device.OpenDmaChannelAsync(cancellationToken: c.Stop));
            }
            catch
            {
                await session.DisposeAsync();
                throw;
            }
        }

        public async ValueTask DisposeAsync()
        {
            await Dma.DisposeAsync();
            await Device.DisposeAsync();
            await Session.DisposeAsync();
        }
    }

    /// <summary>A device round trip: the device writes a pattern into memory, the CPU checks it, the device reads it back.</summary>
    public static async Task<int> DmaAsync(CommandContext c)
    {
        var address = c.Arg(0, "address");
        var bytes = c.Int("--bytes", 4096, 1, 4 * 1024 * 1024);
        await using var rig = await Rig.OpenAsync(c, address, (ulong)bytes);
        var pattern = Enumerable.Range(0, bytes).Select(i => (byte)(i * 13 + 1)).ToArray();
        var clock = Stopwatch.StartNew();
        (await rig.Dma.WriteAsync(Iova, pattern, c.Stop)).EnsureOk();
        var seen = await rig.Buffer.ReadAsync(0, bytes, c.Stop);
        var back = (await rig.Dma.ReadAsync(Iova, bytes, c.Stop)).EnsureOk();
        var ok = seen.AsSpan().SequenceEqual(pattern) && back.Data.Span.SequenceEqual(pattern);
        if (c.Output.Json)
            c.Output.Line(JsonSerializer.Serialize(new { device = address, bytes, iova = Iova, ok, microseconds = clock.Elapsed.TotalMicroseconds }));
        else
            c.Output.Line($"{address}: device wrote {bytes} bytes at IOVA 0x{Iova:x}, CPU read them, device read them back: {(ok ? "intact" : "MISMATCH")} ({clock.Elapsed.TotalMilliseconds:F2} ms)");
        return ok ? Cli.Ok : Cli.Rejected;
    }

    /// <summary>DMA write throughput with a live progress line.</summary>
    public static async Task<int> BenchAsync(CommandContext c)
    {
        var address = c.Arg(0, "address");
        var size = c.Int("--size", 64 * 1024, 1, 4 * 1024 * 1024);
        var seconds = c.Int("--seconds", 5, 1, 3600);
        var window = c.Int("--window", 64, 1, 4096);
        await using var rig = await Rig.OpenAsync(c, address, (ulong)Math.Max(size, 4096));
        var data = new byte[size];
        var clock = Stopwatch.StartNew();
        var deadline = TimeSpan.FromSeconds(seconds);
        var inFlight = new Queue<Task<DmaResult>>();
        long done = 0;
        var lastReport = TimeSpan.Zero;
        var interactive = !c.Output.Json && !Console.IsOutputRedirected;
        while (clock.Elapsed < deadline && !c.Stop.IsCancellationRequested)
        {
            while (inFlight.Count < window)
                inFlight.Enqueue(rig.Dma.WriteAsync(Iova, data, CancellationToken.None));
            (await inFlight.Dequeue()).EnsureOk();
            done++;
            if (clock.Elapsed - lastReport >= TimeSpan.FromMilliseconds(500))
            {
                lastReport = clock.Elapsed;
                var line = Progress(done, size, clock.Elapsed, deadline);
                if (interactive)
                    c.Output.Writer.Write($"\r{line}   ");
                else if (!c.Output.Json)
                    c.Output.Line(line);
            }
        }
        while (inFlight.Count > 0)
        {
            (await inFlight.Dequeue()).EnsureOk();
            done++;
        }
        var elapsed = clock.Elapsed.TotalSeconds;
        if (interactive)
            c.Output.Writer.WriteLine();
        if (c.Output.Json)
            c.Output.Line(JsonSerializer.Serialize(new { device = address, size, operations = done, seconds = elapsed, opsPerSecond = done / elapsed, mibPerSecond = done * (double)size / elapsed / (1 << 20) }));
        else
            c.Output.Line($"{address}: {done} DMA writes of {size} bytes in {elapsed:F2} s: {done / elapsed:F0} ops/s, {done * (double)size / elapsed / (1 << 20):F1} MiB/s");
        return Cli.Ok;
    }

    private static string Progress(long done, int size, TimeSpan elapsed, TimeSpan deadline)
    {
        var fraction = Math.Min(1, elapsed / deadline);
        var bar = new string('#', (int)(fraction * 20)).PadRight(20, '.');
        return string.Create(CultureInfo.InvariantCulture,
            $"[{bar}] {elapsed.TotalSeconds,5:F1}s  {done,9} ops  {done / elapsed.TotalSeconds,9:F0} ops/s  {done * (double)size / elapsed.TotalSeconds / (1 << 20),8:F1} MiB/s");
    }
}
