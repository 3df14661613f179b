using DmaBroker.Protocol.V1;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// The NVMe sample driver as a user runs it, against a broker process: it takes the controller
/// from the kernel's nvme driver, drives it from userspace with data checked end to end, and
/// leaves the broker as it found it — the device back on nvme, its group kernel-owned, nothing
/// held. Run with its defaults on a fresh broker, it prints exactly what the README shows.
/// </summary>
public sealed class NvmeDriverTests
{
    private const string Nvme = "0000:01:00.0";
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task NvmeDriver_AgainstALiveBroker_VerifiesItsDataAndGivesTheDeviceBackToNvme()
    {
        await using var broker = await LiveBroker.StartAsync();
        await using var watch = await GroupWatch.StartAsync(broker.Client);
        var group = (await broker.Client.ListDevicesAsync()).Devices.Single(d => d.Address == Nvme).GroupId;
        Assert.Equal(OwnerKind.Kernel, watch.Groups[group].OwnerKind);

        await using var driver = ClientProcess.StartNvmeDriver(broker.Address, Nvme);
        var exit = await driver.WaitForExitAsync(Timeout);

        Assert.True(exit == 0, $"{driver.Name} exited {exit}:\n{driver.Transcript}");
        Assert.Equal("done: 64 writes + 64 reads of 32 KiB at QD 16, data verified", driver.Stdout[^1]);
        Assert.Equal(ReadmeOutput(), driver.Stdout);
        // The group went to the driver's session and came back to the kernel when nvme was bound again.
        var owner = await watch.WaitForAsync(group, OwnerKind.User);
        Assert.NotEqual(0UL, owner.OwnerSession);
        await watch.WaitForAsync(group, OwnerKind.Kernel);
        Assert.Empty(watch.UserOwners());
        Assert.Empty(watch.Violations);
        Assert.Equal("nvme", (await broker.Client.ListDevicesAsync()).Devices.Single(d => d.Address == Nvme).Driver);
        var stats = await broker.StatsAsync();
        Assert.Equal((0u, 0u, 0u, 0u, 0UL), (stats.Sessions, stats.UserOwnedGroups, stats.OpenDevices, stats.Mappings, stats.MemoryBytes));
    }

    /// <summary>The lines of the README's console block after <c>$ dotnet run --project clients/samples/NvmeDriver</c>.</summary>
    private static string[] ReadmeOutput()
    {
        var readme = File.ReadAllLines(Path.Combine(DocumentationTests.RepositoryRoot(), "README.md"));
        var command = Array.IndexOf(readme, "$ dotnet run --project clients/samples/NvmeDriver");
        Assert.True(command >= 0, "README.md lost the NVMe driver's example run");
        var end = Array.IndexOf(readme, "```", command);
        return readme[(command + 1)..end];
    }
}
