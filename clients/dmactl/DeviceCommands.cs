using System.CommandLine;
using System.Diagnostics;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Ctl;

/// <summary>dmactl dma and bench: claim a device for a private session and drive its DMA.</summary>
internal static class DeviceCommands
{
    private const ulong Iova = 0x10_0000;
    private const int MaxBytes = 4 * 1024 * 1024;

    public static readonly Option<int> Bytes = Ranged("--bytes", "How many bytes the device writes and reads back", 4096, 1, MaxBytes);
    public static readonly Option<int> Size = Ranged("--size", "Bytes per DMA write", 64 * 1024, 1, MaxBytes);
    public static readonly Option<int> Seconds = Ranged("--seconds", "How long to run", 5, 1, 3600);
    public static readonly Option<int> Window = Ranged("--window", "DMA writes in flight at once", 64, 1, 4096);

    /// <summary>A whole-number option with a default and a range; a value outside it is a usage error.</summary>
    private static Option<int> Ranged(string name, string description, int fallback, int min, int max)
    {
        var option = new Option<int>(name) { Description = $"{description} ({min} to {max})", DefaultValueFactory = _ => fallback, HelpName = "N" };
        option.Validators.Add(result =>
        {
            if (result.GetValueOrDefault<int>() is var value && (value < min || value > max))
                result.AddError($"{name} takes a number from {min} to {max}, got {value}");
        });
        return option;
    }

    /// <summary>A session holding one device's group, with memory mapped and the device open.</summary>
    private sealed record Rig(BrokerSession Session, DmaBuffer Buffer, VfioDevice Device, DmaChannel Dma) : IAsyncDisposable
    {
        public static async Task<Rig> OpenAsync(CommandContext c, string address, ulong bytes)
        {
            var info = (await c.Client.ListDevicesAsync(c.Stop)).Devices.FirstOrDefault(d => d.Address == address)
                ?? throw new UsageException($"no device {address}; see 'dmactl devices'", showUsage: false);
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
        var address = c.Value(Commands.Address);
        var bytes = c.Value(Bytes);
        await using var rig = await Rig.OpenAsync(c, address, (ulong)bytes);
        var pattern = Enumerable.Range(0, bytes).Select(i => (byte)(i * 13 + 1)).ToArray();
        var clock = Stopwatch.StartNew();
        var ok = await c.Output.WithProgressAsync($"DMA round trip, {bytes} bytes", 3, async progress =>
        {
            (await rig.Dma.WriteAsync(Iova, pattern, c.Stop)).EnsureOk();
            progress(1, "device wrote");
            var seen = await rig.Buffer.ReadAsync(0, bytes, c.Stop);
            progress(2, "CPU read");
            var back = (await rig.Dma.ReadAsync(Iova, bytes, c.Stop)).EnsureOk();
            progress(3, "device read back");
            return seen.AsSpan().SequenceEqual(pattern) && back.Data.Span.SequenceEqual(pattern);
        });
        c.Output.Result(
            $"{address}: device wrote {bytes} bytes at IOVA 0x{Iova:x}, CPU read them, device read them back: {(ok ? "intact" : "MISMATCH")} ({clock.Elapsed.TotalMilliseconds:F2} ms)",
            ("device", address), ("bytes", bytes), ("iova", Iova), ("ok", ok), ("microseconds", clock.Elapsed.TotalMicroseconds));
        return ok ? Cli.Ok : Cli.Rejected;
    }

    /// <summary>DMA write throughput, with a progress bar on a terminal.</summary>
    public static async Task<int> BenchAsync(CommandContext c)
    {
        var address = c.Value(Commands.Address);
        var size = c.Value(Size);
        var seconds = c.Value(Seconds);
        var window = c.Value(Window);
        await using var rig = await Rig.OpenAsync(c, address, (ulong)Math.Max(size, 4096));
        var data = new byte[size];
        var clock = Stopwatch.StartNew();
        var deadline = TimeSpan.FromSeconds(seconds);
        var done = await c.Output.WithProgressAsync($"DMA writes of {size} bytes", seconds, async progress =>
        {
            var inFlight = new Queue<Task<DmaResult>>();
            long done = 0;
            while (clock.Elapsed < deadline && !c.Stop.IsCancellationRequested)
            {
                while (inFlight.Count < window)
                    inFlight.Enqueue(rig.Dma.WriteAsync(Iova, data, CancellationToken.None));
                (await inFlight.Dequeue()).EnsureOk();
                done++;
                if (done % 64 == 0)
                    progress(Math.Min(seconds, clock.Elapsed.TotalSeconds), Rate(done, size, clock.Elapsed.TotalSeconds));
            }
            while (inFlight.Count > 0)
            {
                (await inFlight.Dequeue()).EnsureOk();
                done++;
            }
            progress(seconds, Rate(done, size, clock.Elapsed.TotalSeconds));
            return done;
        });
        var elapsed = clock.Elapsed.TotalSeconds;
        c.Output.Result($"{address}: {done} DMA writes of {size} bytes in {elapsed:F2} s: {Rate(done, size, elapsed)}",
            ("device", address), ("size", size), ("operations", done), ("seconds", elapsed),
            ("opsPerSecond", done / elapsed), ("mibPerSecond", done * (double)size / elapsed / (1 << 20)));
        return Cli.Ok;
    }

    private static string Rate(long done, int size, double seconds) =>
        FormattableString.Invariant($"{done / seconds:F0} ops/s, {done * (double)size / seconds / (1 << 20):F1} MiB/s");
}
