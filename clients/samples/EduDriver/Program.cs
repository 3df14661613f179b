// A userspace driver for QEMU's edu device, written only against DmaBroker.Client: the VFIO
// ownership dance, then liveness, factorial, and DMA both ways. The device runs a DMA after its
// command returns (docs/edu.md), so the driver waits for it as a real edu driver does: RAM to the
// device by polling the command's start bit, the device back to RAM by its completion interrupt.
//   dotnet run --project clients/samples/EduDriver -- [--broker URL] [--device 0000:08:00.0]
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

const uint Bar0 = 0;
const ulong Iova = 0x10_0000;        // inside edu's 28-bit DMA mask
const ulong DeviceBuffer = 0x40000;  // edu's 4 KiB DMA buffer, in device address space
const int Length = 4096;

var broker = Option("--broker") ?? Environment.GetEnvironmentVariable(BrokerClient.AddressVariable);
var address = Option("--device") ?? "0000:08:00.0";

try
{
    using var client = BrokerClient.Connect(broker);
    var device = (await client.ListDevicesAsync()).Devices.FirstOrDefault(d => d.Address == address)
        ?? throw new ArgumentException($"no device {address}; see 'dmactl devices'");
    if (device.Model != "edu")
        throw new ArgumentException($"{address} is a {device.Model}, not an edu device");

    await using var session = await client.OpenSessionAsync("edu-driver");
    Console.WriteLine($"session {session.Id}: claiming group {device.GroupId} for {address}");
    var container = await session.NewContainerAsync(ContainerType.Type1V2);
    await container.SetGroupAsync(device.GroupId);

    var buffer = await session.AllocateAsync(2 * Length);
    var pattern = Enumerable.Range(0, Length).Select(i => (byte)(i * 31 + 7)).ToArray();
    await buffer.WriteAsync(0, pattern);
    await container.MapAsync(buffer, Iova);
    Console.WriteLine($"mapped {buffer.Size} bytes of memory at vaddr 0x{buffer.Vaddr:x} to IOVA 0x{Iova:x}");

    await using var edu = await session.OpenDeviceAsync(address);
    await edu.EnableBusMasterAsync();
    await using var dma = await edu.OpenDmaChannelAsync();

    var id = (await dma.MmioReadAsync(Bar0, 0x00)).EnsureOk().Value;
    Console.WriteLine($"identification: 0x{id:x8} (version {id >> 24}.{(id >> 16) & 0xff})");

    await dma.MmioWriteAsync(Bar0, 0x04, 0xcafe0000);
    var liveness = (await dma.MmioReadAsync(Bar0, 0x04)).Value;
    Check(liveness == (~0xcafe0000u & 0xffffffff), $"liveness: wrote 0xcafe0000, read back 0x{liveness:x8} (the inverse)");

    await dma.MmioWriteAsync(Bar0, 0x20, 0x80);          // raise an interrupt when the factorial is done
    await dma.MmioWriteAsync(Bar0, 0x08, 10);
    var factorial = (await dma.MmioReadAsync(Bar0, 0x08)).Value;
    await ExpectInterrupt(0x001, "factorial");
    Check(factorial == 3628800, $"factorial: 10! = {factorial}");

    await StartDma(src: Iova, dst: DeviceBuffer, command: 0x1);
    await PollDmaDone("DMA RAM -> device buffer");
    await StartDma(src: DeviceBuffer, dst: Iova + Length, command: 0x1 | 0x2 | 0x4);
    await ExpectInterrupt(0x100, "DMA device buffer -> RAM");
    Check(((await dma.MmioReadAsync(Bar0, 0x98, 8)).Value & 0x1) == 0, "DMA device buffer -> RAM: the start bit is clear after the interrupt");
    var copied = await buffer.ReadAsync(Length, Length);
    Check(copied.AsSpan().SequenceEqual(pattern), $"memory check: {Length} bytes came back intact through the device");
    Console.WriteLine("edu driver: all checks passed");
    return 0;

    async Task StartDma(ulong src, ulong dst, ulong command)
    {
        await dma.MmioWriteAsync(Bar0, 0x80, src, 8);
        await dma.MmioWriteAsync(Bar0, 0x88, dst, 8);
        await dma.MmioWriteAsync(Bar0, 0x90, Length, 8);
        (await dma.MmioWriteAsync(Bar0, 0x98, command, 8)).EnsureOk();
    }

    // Each read is a round trip to the broker, so the loop paces itself; the deadline catches a device that never finishes.
    async Task PollDmaDone(string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        ulong command;
        do
            command = (await dma.MmioReadAsync(Bar0, 0x98, 8)).EnsureOk().Value;
        while ((command & 0x1) != 0 && DateTime.UtcNow < deadline);
        Check((command & 0x1) == 0, $"{what}: the start bit cleared");
    }

    async Task ExpectInterrupt(uint cause, string what)
    {
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(5));
        var vector = await dma.Interrupts.ReadAsync(timeout.Token);
        var status = (uint)(await dma.MmioReadAsync(Bar0, 0x24)).Value;
        await dma.MmioWriteAsync(Bar0, 0x64, status);        // acknowledge
        Check((status & cause) != 0, $"interrupt on vector {vector}: status 0x{status:x} after {what}");
    }
}
catch (BrokerException e)
{
    Console.Error.WriteLine($"edu-driver: {e.Reason}: {e.Message}");
    return e is BrokerUnavailableException ? 3 : 1;
}
catch (DmaFaultException e)
{
    Console.Error.WriteLine($"edu-driver: {e.Message}");
    return 1;
}
catch (ArgumentException e)
{
    Console.Error.WriteLine($"edu-driver: {e.Message}");
    return 2;
}
catch (InvalidOperationException e)
{
    Console.Error.WriteLine($"edu-driver: {e.Message}");
    return 1;
}

static void Check(bool ok, string what)
{
    Console.WriteLine($"{(ok ? "ok  " : "FAIL")} {what}");
    if (!ok)
        throw new InvalidOperationException($"check failed: {what}");
}

string? Option(string name)
{
    var i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
}
